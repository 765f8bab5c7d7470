"""Tests of dyvedeep.fetch: checksum kinds, mirror lookup, cache reuse, mismatches (API and CLI),
the offline message, recorded sha256, and a real HTTP download from a local server."""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
from pathlib import Path
from typing import Iterator

import pytest

from dyvedeep import cli
from dyvedeep import fetch as fetch_mod
from dyvedeep.errors import DyveError
from dyvedeep.fetch import fetch, file_checksum, parse_checksum, resolve_mirror, sidecar_path

URL = "https://example.org/files/v1/data.bin"
DATA = b"DyVEDeep test payload\n" * 100


def put_in_mirror(mirror: Path, url: str, data: bytes) -> Path:
    """Write ``data`` where ``url`` lies in a fake mirror (the URL without its scheme)."""
    path = fetch_mod.mirror_path(mirror, url)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def fake_mirror(tmp_path: Path) -> Path:
    """A mirror holding DATA at URL."""
    mirror = tmp_path / "mirror"
    put_in_mirror(mirror, URL, DATA)
    return mirror


@pytest.fixture
def no_default_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No mirror from the environment, the current directory or the project root (and no HTTP
    proxy, so that requests to 127.0.0.1 stay local)."""
    for var in ("DYVEDEEP_MIRROR", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    work = tmp_path / "nomirror" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setattr(fetch_mod, "project_root", lambda: work)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


def test_git_blob_sha1_of_known_string(tmp_path: Path) -> None:
    path = tmp_path / "hello.txt"
    path.write_bytes(b"hello world\n")
    # `echo 'hello world' | git hash-object --stdin`
    assert git_blob_sha1(b"hello world\n") == "3b18e512dba79e4c8300dd08aeb37f8e728b8dad"
    assert file_checksum(path, "gitsha1") == "gitsha1:3b18e512dba79e4c8300dd08aeb37f8e728b8dad"
    assert file_checksum(path, "sha1") != file_checksum(path, "gitsha1").replace("git", "")


@pytest.mark.parametrize("kind", ["sha256", "sha1", "md5", "gitsha1"])
def test_each_checksum_kind_verifies(kind: str, fake_mirror: Path, tmp_path: Path) -> None:
    digest = git_blob_sha1(DATA) if kind == "gitsha1" else hashlib.new(kind, DATA).hexdigest()
    path = fetch(URL, f"{kind}:{digest.upper()}", mirror=fake_mirror, cache_dir=tmp_path / "c",
                 progress=False)
    assert path.read_bytes() == DATA
    # one wrong digit is a mismatch
    bad = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    with pytest.raises(DyveError, match=kind):
        fetch(URL, f"{kind}:{bad}", mirror=fake_mirror, cache_dir=tmp_path / "c2", progress=False)


def test_malformed_checksum_is_an_error() -> None:
    for text in ("sha256:abc", "crc32:00000000", "deadbeef", "md5:" + "g" * 32):
        with pytest.raises(DyveError, match="bad checksum"):
            parse_checksum(text)


def test_mirror_lookup_and_cache_layout(fake_mirror: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path = fetch(URL, "sha256:" + hashlib.sha256(DATA).hexdigest(), mirror=fake_mirror,
                 cache_dir=cache, progress=False)
    assert path == cache / "example.org/files/v1/data.bin"
    assert path.read_bytes() == DATA
    record = json.loads(sidecar_path(path).read_text())
    assert record["size"] == len(DATA)


def test_resolve_mirror_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    explicit.mkdir()
    env.mkdir()
    (tmp_path / "shared" / "mirror").mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("DYVEDEEP_MIRROR", str(env))
    assert resolve_mirror(explicit) == explicit.resolve()
    assert resolve_mirror(None) == env.resolve()
    monkeypatch.delenv("DYVEDEEP_MIRROR")
    assert resolve_mirror(None) == (tmp_path / "shared" / "mirror").resolve()
    with pytest.raises(DyveError, match="does not exist"):
        resolve_mirror(tmp_path / "missing")


def test_cache_is_reused_without_mirror(fake_mirror: Path, tmp_path: Path,
                                        no_default_mirror: None) -> None:
    checksum = "sha256:" + hashlib.sha256(DATA).hexdigest()
    cache = tmp_path / "cache"
    first = fetch(URL, checksum, mirror=fake_mirror, cache_dir=cache, progress=False)
    (fake_mirror / "example.org/files/v1/data.bin").unlink()
    # no mirror, no network: only the cache can answer
    assert fetch(URL, checksum, cache_dir=cache, progress=False) == first
    assert fetch(URL, None, cache_dir=cache, progress=False) == first


def test_corrupt_cache_is_fetched_again(fake_mirror: Path, tmp_path: Path) -> None:
    checksum = "sha256:" + hashlib.sha256(DATA).hexdigest()
    cache = tmp_path / "cache"
    path = fetch(URL, checksum, mirror=fake_mirror, cache_dir=cache, progress=False)
    path.write_bytes(b"X" + DATA[1:])
    assert fetch(URL, checksum, mirror=fake_mirror, cache_dir=cache, progress=False).read_bytes() == DATA


def test_cache_rehashes_a_file_with_unchanged_size_and_mtime_when_given_a_checksum(
        fake_mirror: Path, tmp_path: Path) -> None:
    """A corrupted cache file with the size and mtime its record holds is still caught."""
    import os

    checksum = "sha256:" + hashlib.sha256(DATA).hexdigest()
    cache = tmp_path / "cache"
    path = fetch(URL, checksum, mirror=fake_mirror, cache_dir=cache, progress=False)
    st = path.stat()
    path.write_bytes(b"X" + DATA[1:])
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fetch(URL, checksum, mirror=fake_mirror, cache_dir=cache, progress=False).read_bytes() == DATA


@pytest.mark.parametrize("where", ["directory", "under_a_file"])
def test_cache_or_dest_that_cannot_be_written_is_one_line(where: str, fake_mirror: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("dyvedeep.fetch",))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    if where == "directory":  # the cached copy's own path is a directory
        cache = tmp_path / "cache"
        fetch_mod.cache_path(URL, cache).mkdir(parents=True)
    else:
        cache = blocker / "cache"
    code = cli.main(["fetch", URL, "--mirror", str(fake_mirror), "--cache", str(cache)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("dyvedeep: error: "), err
    assert ("is a directory" if where == "directory" else "cannot write there") in err[0]


def test_dest_gets_verified_copy(fake_mirror: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "model.bin"
    got = fetch(URL, "md5:" + hashlib.md5(DATA).hexdigest(), dest=dest, mirror=fake_mirror,
                cache_dir=tmp_path / "cache", progress=False)
    assert got == dest and dest.read_bytes() == DATA


def test_mismatch_names_file_and_leaves_nothing(fake_mirror: Path, tmp_path: Path) -> None:
    wrong = "sha256:" + "0" * 64
    dest = tmp_path / "out" / "model.bin"
    cache = tmp_path / "cache"
    with pytest.raises(DyveError) as info:
        fetch(URL, wrong, dest=dest, mirror=fake_mirror, cache_dir=cache, progress=False)
    message = str(info.value)
    assert "mirror" in message and str(fake_mirror / "example.org/files/v1/data.bin") in message
    assert wrong in message and hashlib.sha256(DATA).hexdigest() in message
    assert "not falling back" in message
    assert not dest.exists()
    assert not (cache / "example.org/files/v1/data.bin").exists()
    assert [p.name for p in (cache / "example.org/files/v1").iterdir()] == []


def test_mismatch_through_cli(fake_mirror: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("dyvedeep.fetch",))
    dest = tmp_path / "dest.bin"
    rc = cli.main(["fetch", URL, "--checksum", "sha1:" + "1" * 40, "-o", str(dest),
                   "--mirror", str(fake_mirror), "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.count("\n") == 1 and err.startswith("dyvedeep: error:") and URL in err
    assert not dest.exists()


def test_cli_prints_final_path(fake_mirror: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("dyvedeep.fetch",))
    dest = tmp_path / "dest.bin"
    rc = cli.main(["fetch", URL, "--checksum", "gitsha1:" + git_blob_sha1(DATA), "-o", str(dest),
                   "--mirror", str(fake_mirror), "--cache", str(tmp_path / "cache")])
    assert rc == 0
    assert capsys.readouterr().out.strip() == str(dest)
    assert dest.read_bytes() == DATA


def test_offline_without_mirror_says_how_to_set_one(tmp_path: Path, no_default_mirror: None) -> None:
    url = "http://127.0.0.1:9/x"
    with pytest.raises(DyveError) as info:
        fetch(url, None, cache_dir=tmp_path / "cache", progress=False)
    message = str(info.value)
    assert url in message and "--mirror DIR" in message and "DYVEDEEP_MIRROR" in message
    assert "\n" not in message
    assert not (tmp_path / "cache" / "127.0.0.1:9" / "x").exists()


def test_sha256_recorded_at_first_download(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror_file = put_in_mirror(mirror, URL, DATA)
    cache = tmp_path / "cache"
    path = fetch(URL, None, mirror=mirror, cache_dir=cache, progress=False)
    record = json.loads(sidecar_path(path).read_text())
    assert "sha256:" + hashlib.sha256(DATA).hexdigest() in record["checksums"]
    # the upstream file changes: a new fetch is checked against the recorded sha256
    path.unlink()
    mirror_file.write_bytes(DATA + b"changed")
    with pytest.raises(DyveError, match="expected sha256:" + hashlib.sha256(DATA).hexdigest()):
        fetch(URL, None, mirror=mirror, cache_dir=cache, progress=False)
    assert not path.exists()


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A local HTTP server (loopback only) serving a temporary directory."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_download_over_http(http_root: tuple[Path, str], tmp_path: Path, no_default_mirror: None) -> None:
    root, base = http_root
    (root / "weights.bin").write_bytes(DATA)
    url = f"{base}/weights.bin"
    good = "sha256:" + hashlib.sha256(DATA).hexdigest()
    with pytest.raises(DyveError, match="not saved"):
        fetch(url, "sha256:" + "f" * 64, cache_dir=tmp_path / "c", progress=False)
    assert not any(p.is_file() for p in (tmp_path / "c").rglob("*"))
    path = fetch(url, good, cache_dir=tmp_path / "c", progress=False)
    assert path.read_bytes() == DATA
    with pytest.raises(DyveError, match="404"):
        fetch(f"{base}/missing.bin", good, cache_dir=tmp_path / "c", progress=False)
