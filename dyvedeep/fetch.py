"""Downloads verified by checksum, the offline mirror first: :func:`fetch` and ``dyvedeep fetch``.

Every model and data file is named by its real URL. :func:`fetch` looks for it, in order, in

1. the cache: ``<cache>/<url without scheme>``, where ``<cache>`` is ``cache_dir`` (CLI
   ``--cache DIR``), else ``$DYVEDEEP_CACHE``, else ``resources/cache`` under the current
   directory. A sidecar ``<file>.dyvedeep.json`` records the checksums the file was verified
   against with its size and mtime, so a cached file is re-hashed only when it changed;
2. the mirror (see :func:`resolve_mirror`): ``<mirror>/<url without scheme>``, copied into the
   cache;
3. the URL itself (urllib, with a timeout, streamed to a temporary file).

A file is verified before it gets its final name; a mismatch raises
:class:`~dyvedeep.errors.DyveError` naming the file, the expected and the actual checksum, and
leaves nothing under the final name. A bad mirror copy is an error, never a silent fall-back to
the web. Checksums are written ``KIND:HEX`` with KIND one of ``sha256``, ``sha1``, ``md5`` or
``gitsha1`` (git's blob id: sha1 of ``b"blob <size>\\0" + data``). Without a checksum the sha256
of the first download is recorded in the sidecar and later uses are verified against it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from . import __version__
from .errors import DyveError
from .io_utils import atomic_path, write_json_atomic

CHECKSUM_KINDS: dict[str, int] = {"sha256": 64, "sha1": 40, "gitsha1": 40, "md5": 32}
"""Supported checksum kinds and the length of their hex digests."""

SIDECAR_SUFFIX = ".dyvedeep.json"
MIRROR_ENV = "DYVEDEEP_MIRROR"
CACHE_ENV = "DYVEDEEP_CACHE"
DEFAULT_CACHE = Path("resources") / "cache"
TIMEOUT_S = 60.0
_CHUNK = 1 << 20
_MIRROR_HINT = f"set a mirror directory laid out by URL with --mirror DIR or {MIRROR_ENV}=DIR"


# --- checksums -------------------------------------------------------------------------------

def parse_checksum(checksum: str) -> tuple[str, str]:
    """Split ``"KIND:HEX"`` into (kind, lower-case hex); DyveError when malformed."""
    kind, sep, digest = checksum.strip().partition(":")
    kind, digest = kind.lower(), digest.lower()
    if (
        not sep
        or kind not in CHECKSUM_KINDS
        or len(digest) != CHECKSUM_KINDS[kind]
        or not re.fullmatch(r"[0-9a-f]+", digest)
    ):
        raise DyveError(
            f"bad checksum {checksum!r}: expected one of "
            + ", ".join(f"{k}:<{n} hex digits>" for k, n in CHECKSUM_KINDS.items())
        )
    return kind, digest


def normalize_checksum(checksum: str) -> str:
    """The canonical ``kind:hex`` spelling of a checksum string."""
    kind, digest = parse_checksum(checksum)
    return f"{kind}:{digest}"


def _hasher(kind: str, size: int) -> Any:
    """A fresh hashlib object for ``kind`` (git blob ids need the size up front)."""
    if kind == "gitsha1":
        h = hashlib.sha1(usedforsecurity=False)
        h.update(b"blob %d\0" % size)
        return h
    return hashlib.new(kind, usedforsecurity=False)


def file_checksum(path: str | os.PathLike[str], kind: str = "sha256") -> str:
    """Checksum of a file as ``kind:hex``."""
    path = Path(path)
    h = _hasher(kind, path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return f"{kind}:{h.hexdigest()}"


# --- locations -------------------------------------------------------------------------------

def project_root() -> Path:
    """The project's root directory (the parent of the ``dyvedeep`` package)."""
    return Path(__file__).resolve().parent.parent


def url_relpath(url: str) -> Path:
    """Where ``url`` lies in a mirror or the cache: the URL without its scheme."""
    scheme, sep, rest = url.partition("://")
    parts = rest.split("/")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme) or len(parts) < 2:
        raise DyveError(f"not a URL of a file: {url!r}")
    if any(p in ("", ".", "..") for p in parts):
        raise DyveError(f"URL {url!r} has an empty, '.' or '..' path component")
    return Path(*parts)


def mirror_path(mirror: str | os.PathLike[str], url: str) -> Path:
    """Where ``url`` lies in the mirror directory ``mirror`` (the one URL -> mirror path rule)."""
    return Path(mirror) / url_relpath(url)


def resolve_mirror(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The mirror directory: ``explicit`` (``--mirror``), else ``$DYVEDEEP_MIRROR``, else
    ``../shared/mirror`` from the current directory, else from the project root, else None.

    An explicit or environment mirror that is not a directory is an error.
    """
    for value, origin in ((explicit, "--mirror"), (os.environ.get(MIRROR_ENV) or None, MIRROR_ENV)):
        if value is not None:
            path = Path(value).expanduser()
            if not path.is_dir():
                raise DyveError(f"mirror directory {path} (from {origin}) does not exist")
            return path.resolve()
    for base in (Path.cwd(), project_root()):
        candidate = base.parent / "shared" / "mirror"
        if candidate.is_dir():
            return candidate.resolve()
    return None


def resolve_cache(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: ``explicit`` (``--cache``), else ``$DYVEDEEP_CACHE``, else
    ``resources/cache`` under the current directory."""
    if explicit is not None:
        return Path(explicit).expanduser().absolute()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().absolute()
    return Path.cwd() / DEFAULT_CACHE


def cache_path(url: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where :func:`fetch` keeps the verified copy of ``url``."""
    return resolve_cache(cache_dir) / url_relpath(url)


# --- sidecar records -------------------------------------------------------------------------

def sidecar_path(path: Path) -> Path:
    """The record beside a cached file: verified checksums, size and mtime."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _read_record(path: Path) -> dict[str, Any]:
    """The sidecar record of ``path``, or {} when absent or unreadable."""
    try:
        record = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_record(path: Path, url: str, checksums: list[str]) -> None:
    """Record that ``path`` (as it is now) has ``checksums``."""
    st = path.stat()
    write_json_atomic(
        sidecar_path(path),
        {
            "url": url,
            "checksums": sorted(set(checksums)),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
        },
    )


def _recorded_sha256(record: dict[str, Any]) -> str | None:
    """The sha256 a record holds (the reference when no checksum is given), if any."""
    for c in record.get("checksums", []):
        if isinstance(c, str) and c.startswith("sha256:"):
            return c
    return None


def _cache_hit(path: Path, url: str, expected: str | None) -> bool:
    """True when ``path`` holds the verified file. Asked for a checksum (``expected``), the file
    is hashed again: an unchanged size and mtime do not prove unchanged bytes. Without one, the
    record of an unchanged file stands. A cached file that fails verification is removed (with
    a note on stderr) so that it is fetched again."""
    if not path.is_file():
        return False
    record = _read_record(path)
    reference = expected or _recorded_sha256(record)
    st = path.stat()
    fresh = record.get("size") == st.st_size and record.get("mtime_ns") == st.st_mtime_ns
    if expected is None and reference is not None and fresh and reference in record.get("checksums", []):
        return True
    kind = parse_checksum(reference)[0] if reference else "sha256"
    actual = file_checksum(path, kind)
    if reference is None or actual == reference:
        known = list(record.get("checksums", [])) if fresh or actual == reference else []
        _write_record(path, url, known + [actual])
        return True
    print(
        f"dyvedeep: cached {path} has {actual}, expected {reference}; fetching it again",
        file=sys.stderr,
    )
    path.unlink()
    return False


# --- transfer --------------------------------------------------------------------------------

class _Progress:
    """A progress line on stderr for downloads that take more than a second."""

    def __init__(self, label: str, total: int | None, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.done = 0
        self.start = self.last = time.monotonic()
        self.shown = False
        self.tty = sys.stderr.isatty()

    def update(self, n: int) -> None:
        """Count ``n`` more bytes; redraw at most once a second (every 15 s without a tty)."""
        self.done += n
        now = time.monotonic()
        if not self.enabled or now - self.start < 1.0 or now - self.last < (1.0 if self.tty else 15.0):
            return
        self.last = now
        self._show()

    def _show(self) -> None:
        mb = self.done / 1e6
        text = f"dyvedeep: fetching {self.label}: {mb:.1f} MB"
        if self.total:
            text += f" of {self.total / 1e6:.1f} MB ({100 * self.done // self.total}%)"
        print(("\r" + text) if self.tty else text, end="" if self.tty else "\n", file=sys.stderr, flush=True)
        self.shown = True

    def finish(self) -> None:
        """Final state of the line, when one was shown."""
        if self.shown:
            self._show()
            if self.tty:
                print(file=sys.stderr)


def _quote_url(url: str) -> str:
    """Percent-encode what urllib cannot send (spaces, non-ASCII), keep the rest."""
    return urllib.parse.quote(url, safe=":/?#[]@!$&'()*+,;=%~")


def _download(url: str, target: Path, progress: bool, miss_note: str) -> None:
    """Stream ``url`` into ``target``; DyveError (one line) when it cannot be had."""
    request = urllib.request.Request(_quote_url(url), headers={"User-Agent": f"dyvedeep/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, open(target, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            meter = _Progress(url.rsplit("/", 1)[-1], total, progress)
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                meter.update(len(chunk))
            meter.finish()
    except urllib.error.HTTPError as err:
        raise DyveError(f"cannot download {url}: HTTP {err.code} {err.reason}; {miss_note}") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise DyveError(f"cannot download {url}: {reason}; {miss_note}") from None
    if total is not None and meter.done != total:
        raise DyveError(f"download of {url} truncated: {meter.done} of {total} bytes; try again")


def _fetch_into(path: Path, url: str, expected: str | None, recorded: bool,
                mirror: Path | None, progress: bool) -> str:
    """Copy ``url`` from the mirror, or download it, into ``path`` atomically after verifying it
    against ``expected`` (``recorded``: that is the sha256 of an earlier download). Returns the
    checksum it verified."""
    source = mirror_path(mirror, url) if mirror is not None else None
    kind = parse_checksum(expected)[0] if expected else "sha256"
    with atomic_path(path) as tmp:
        if source is not None and source.is_file():
            try:
                shutil.copyfile(source, tmp)
            except OSError as err:
                raise DyveError(f"cannot read mirror copy {source}: {err.strerror or err}") from None
            actual = file_checksum(tmp, kind)
            if expected and actual != expected:
                raise DyveError(
                    f"mirror copy {source} of {url} has {actual}, expected {expected}; "
                    "not falling back to the web: replace or remove that mirror file"
                )
        else:
            if mirror is None:
                note = f"no mirror configured ({_MIRROR_HINT})"
            else:
                note = f"not in the mirror {mirror} either ({_MIRROR_HINT})"
            _download(url, tmp, progress, note)
            actual = file_checksum(tmp, kind)
            if expected and actual != expected:
                why = f" (recorded at first download in {sidecar_path(path)}; delete it to accept the new file)" if recorded else ""
                raise DyveError(
                    f"download of {url} has {actual}, expected {expected}{why}; not saved as {path}"
                )
    return actual


def _place(source: Path, dest: Path) -> Path:
    """Put the verified file ``source`` at ``dest`` atomically (hardlink when possible, else
    copy). A ``dest`` that is a directory receives the file under its own name."""
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists() and os.path.samefile(source, dest):
        return dest
    with atomic_path(dest) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
    return dest


# --- public API ------------------------------------------------------------------------------

def fetch(
    url: str,
    checksum: str | None,
    *,
    dest: Path | None = None,
    mirror: Path | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> Path:
    """Return the path of a verified copy of ``url``: the cache, filled from the mirror or the
    web on a miss; or ``dest`` when given (the file is placed there too).

    ``checksum`` is ``"sha256:HEX"``, ``"sha1:HEX"``, ``"gitsha1:HEX"``, ``"md5:HEX"`` or None
    (record the sha256 of the first download, verify later uses against it).
    """
    expected = normalize_checksum(checksum) if checksum else None
    path = cache_path(url, cache_dir)
    if not _cache_hit(path, url, expected):
        record = _read_record(path)
        reference = expected or _recorded_sha256(record)
        actual = _fetch_into(path, url, reference, expected is None and reference is not None,
                             resolve_mirror(mirror), progress)
        _write_record(path, url, [actual])
    if dest is None:
        return path
    return _place(path, Path(dest).expanduser())


def _run(args: argparse.Namespace) -> int:
    """``dyvedeep fetch``: fetch one URL and print where it is."""
    path = fetch(args.url, args.checksum, dest=args.dest, mirror=args.mirror,
                 cache_dir=args.cache, progress=not args.quiet)
    print(path)
    return 0


def register(subparsers: Any) -> None:
    """Add ``dyvedeep fetch URL [--checksum C] [-o DEST] [--mirror DIR] [--cache DIR]``."""
    parser = subparsers.add_parser(
        "fetch",
        help="download a file (mirror first), verify its checksum, print its path",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("url", metavar="URL", help="the file's real URL")
    parser.add_argument("--checksum", metavar="C", default=None,
                        help="sha256:HEX, sha1:HEX, gitsha1:HEX or md5:HEX "
                             "(default: record the sha256 of the first download)")
    parser.add_argument("-o", "--output", dest="dest", metavar="DEST", type=Path, default=None,
                        help="also place the verified file here (a directory keeps the name)")
    parser.add_argument("--mirror", metavar="DIR", type=Path, default=None,
                        help=f"mirror laid out by URL without scheme (default: ${MIRROR_ENV}, "
                             "else ../shared/mirror)")
    parser.add_argument("--cache", metavar="DIR", type=Path, default=None,
                        help=f"cache directory (default: ${CACHE_ENV}, else ./resources/cache)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    parser.set_defaults(func=_run)
