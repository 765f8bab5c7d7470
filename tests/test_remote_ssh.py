"""The SSH path of ``dyvedeep remote`` against a real OpenSSH server on loopback (x86, no
emulation, a few seconds): the test starts its own sshd on a free high port of 127.0.0.1 with a
temporary host key and authorized key, runs the remote setup and a remote command through
:mod:`dyvedeep.remote` and checks that results come back; an unreachable host fails with one line
naming host:port.

To stay fast and offline the board builds a tiny stand-in project (a ``dyvedeep`` console script
without dependencies) rather than the real engine; the real build on an (emulated) aarch64 board
is covered by ``make test-pi`` (tests/pi/). Needs Debian's openssh-server (``make sshd``)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from dyvedeep import remote
from dyvedeep.errors import DyveError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)

# A stand-in project: ``dyvedeep eval|bench MODEL --knobs K [--data npz:D] --json OUT`` writes the
# sizes of its inputs, so the test can check that the right files arrived and the result came back.
FAKE_CLI = '''\
"""Stand-in engine for the loopback SSH test."""
import argparse, json, os, platform, sys

def main():
    p = argparse.ArgumentParser(prog="dyvedeep")
    p.add_argument("--version", action="version", version="dyvedeep fake")
    p.add_argument("command")
    p.add_argument("model")
    p.add_argument("--knobs")
    p.add_argument("--data")
    p.add_argument("--threads", type=int)
    p.add_argument("--limit", type=int)
    p.add_argument("--json")
    a = p.parse_args()
    print("working on", a.model, file=sys.stderr)
    out = {"command": a.command, "model": a.model, "data": a.data, "threads": a.threads,
           "model_bytes": os.path.getsize(a.model), "knobs_text": open(a.knobs).read(),
           "platform": {"machine": platform.machine(), "emulated": False}}
    if a.data:
        out["data_bytes"] = os.path.getsize(a.data.split(":", 1)[1])
    with open(a.json, "w") as fh:
        json.dump(out, fh)
    print("not json: the engine's stdout must not spoil the result")
'''
FAKE_PYPROJECT = '''\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "dyvedeep"
version = "0.0.0"

[project.scripts]
dyvedeep = "dyvedeep.cli:main"

[tool.setuptools]
packages = ["dyvedeep"]
'''


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Wait until something listens on 127.0.0.1:port (or the process dies)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on 127.0.0.1:{port}")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[remote.Board]:
    """A private sshd on loopback, and the Board that reaches it as the current user."""
    if SSHD is None:
        pytest.skip("openssh-server is not installed: run `make sshd` (apt-get install openssh-server)")
    base = tmp_path_factory.mktemp("sshd")
    host_key, client_key = base / "host_ed25519", base / "client_ed25519"
    for key in (host_key, client_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    authorized = base / "authorized_keys"
    shutil.copy(client_key.with_suffix(".pub"), authorized)
    authorized.chmod(0o600)
    port = free_port()
    config = base / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {base / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {authorized}\nStrictModes no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\n"
        "MaxStartups 64\nLogLevel ERROR\n"
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
    log = open(base / "sshd.log", "wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port(port, proc)
    except RuntimeError as err:
        proc.kill()
        pytest.skip(f"cannot run a private sshd here: {err}: {(base / 'sshd.log').read_text()[-200:]}")
    user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else "python3"
    board = remote.Board(host="127.0.0.1", port=port, user=user, key=str(client_key), python=python,
                         workdir=str(base / "board"), name="loopback",
                         known_hosts=str(base / "known_hosts"))
    try:
        yield board
    finally:
        remote.close(board)
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def fake_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A minimal project named dyvedeep (pure Python, no dependencies) for the board to build."""
    root = tmp_path_factory.mktemp("fakeproject")
    (root / "dyvedeep").mkdir()
    (root / "dyvedeep" / "__init__.py").write_text("")
    (root / "dyvedeep" / "cli.py").write_text(FAKE_CLI)
    (root / "pyproject.toml").write_text(FAKE_PYPROJECT)
    (root / "setup.py").write_text("from setuptools import setup\nsetup()\n")
    return root


def test_sdist_is_reproducible_and_includes_the_engine_sources() -> None:
    """The engine version depends on contents only; the kernels and protos are shipped."""
    first, second = remote.build_sdist(), remote.build_sdist()
    assert first.version == second.version and first.data == second.data
    names = {p.relative_to(PROJECT_ROOT).as_posix() for p in remote.sdist_files()}
    assert {"pyproject.toml", "setup.py", "dyvedeep/cli.py", "dyvedeep/caffe.proto"} <= names
    assert "dyvedeep/remote.py" not in names  # the transport is no part of the engine version
    assert "dyvedeep/board_setup.py" not in names and "dyvedeep/imagenet_sample.csv" in names
    if (PROJECT_ROOT / "dyvedeep" / "_kernels.pyx").exists():
        assert "dyvedeep/_kernels.pyx" in names
    assert not any(n.endswith((".so", ".c")) or "__pycache__" in n for n in names)


def test_board_setup_script_is_the_package_file_and_imports_without_running() -> None:
    """setup sends dyvedeep/board_setup.py itself; importing it does nothing (the work is in main)."""
    import importlib

    assert remote.board_setup_script() == (PROJECT_ROOT / "dyvedeep" / "board_setup.py").read_bytes()
    module = importlib.import_module("dyvedeep.board_setup")
    assert callable(module.main) and callable(module.sh)


def test_setup_then_eval_over_ssh(sshd: remote.Board, fake_project: Path, tmp_path: Path) -> None:
    """Setup builds once (a second setup only checks); eval's inputs go over, its JSON comes back."""
    started = time.monotonic()
    leftover = Path(sshd.workdir) / "venvs" / "0123456789abcdef"  # a failed build of another version
    leftover.mkdir(parents=True)
    first = remote.setup(sshd, root=fake_project, onnxruntime=False, build_requirements=("wheel",))
    assert first.built and first.machine == os.uname().machine
    again = remote.setup(sshd, root=fake_project, onnxruntime=False, build_requirements=("wheel",))
    assert not again.built and again.version == first.version and again.seconds < 5
    assert (Path(sshd.workdir) / "venvs" / first.version / remote.READY_MARKER).is_file()
    assert not leftover.exists()

    model, knobs, data = tmp_path / "tiny.onnx", tmp_path / "tiny.yaml", tmp_path / "test.npz"
    model.write_bytes(os.urandom(3000))
    knobs.write_text("conv1: {spet: 0.1}\n")
    data.write_bytes(os.urandom(5000))
    out = tmp_path / "out" / "eval.json"
    obj = remote.run_engine(sshd, "eval", model, knobs, data, ["--limit", "10"], root=fake_project)
    from dyvedeep.io_utils import write_json_atomic
    write_json_atomic(out, obj)
    result = json.loads(out.read_text())
    assert result["model_bytes"] == 3000 and result["data_bytes"] == 5000
    assert result["knobs_text"] == knobs.read_text()
    assert result["model"] == str(model) and result["data"] == f"npz:{data}"
    assert result["platform"] == {"name": "loopback", "machine": os.uname().machine,
                                  "emulated": False, "host": "127.0.0.1"}
    stored = list((Path(sshd.workdir) / "files").glob("*/tiny.onnx"))
    assert len(stored) == 1 and stored[0].read_bytes() == model.read_bytes()
    assert not list((Path(sshd.workdir) / "runs").iterdir())  # run directories are cleaned up

    bench = remote.run_engine(sshd, "bench", model, knobs, None, ["--threads", "2"], root=fake_project,
                              platform_name="pi-loop")
    assert bench["threads"] == 2 and bench["data"] is None and bench["platform"]["name"] == "pi-loop"
    assert time.monotonic() - started < 60  # about 10 s on an idle machine


def test_remote_failure_is_one_line_naming_the_host(sshd: remote.Board, fake_project: Path, tmp_path: Path) -> None:
    """A command that fails on the board raises a one-line DyveError naming host:port."""
    with pytest.raises(DyveError) as info:
        remote.run_engine(sshd, "eval", tmp_path / "missing.onnx", tmp_path / "k.yaml", None, [],
                          root=fake_project)
    assert "missing.onnx" in str(info.value)
    with pytest.raises(DyveError) as info:
        remote.ssh(sshd, "echo oops >&2; exit 3", echo=False, what="a failing command")
    message = str(info.value)
    assert "\n" not in message and sshd.address in message and "oops" in message and "exit 3" in message


def test_unreachable_host_fails_with_one_line(tmp_path: Path) -> None:
    """``dyvedeep remote setup`` to a closed port: non-zero exit, one line naming host:port."""
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "dyvedeep", "remote", "setup", "--host", "127.0.0.1", "--port", str(port),
         "--user", "pi", "--key", str(key), "--known-hosts", str(tmp_path / "known_hosts")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"dyvedeep: error: cannot reach 127.0.0.1:{port} as pi:")
    assert "Connection refused" in lines[0]
    assert time.monotonic() - started < 15


# --------------------------------------------------------------------------- bad input (issue 20)


def remote_cli(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, list[str]]:
    from dyvedeep.cli import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("port", ["0", "70000", "-1"])
def test_port_out_of_range_is_one_line_before_connecting(port: str, tmp_path: Path, capsys) -> None:
    code, lines = remote_cli(capsys, "remote", "setup", "--host", "127.0.0.1", "--user", "pi", "--port", port)
    assert code == 2 and len(lines) == 1 and "port must be an integer in 1..65535" in lines[0], lines
    board = tmp_path / "board.json"
    board.write_text(json.dumps({"host": "127.0.0.1", "user": "pi", "port": int(port)}))
    code, lines = remote_cli(capsys, "remote", "setup", "--board", board)
    assert code == 2 and len(lines) == 1 and "board.json" in lines[0] and "port" in lines[0], lines


@pytest.mark.parametrize("content, needle", [
    ('{"host": "127.0.0.1", "user": "pi", "port": "twenty-two"}', "port"),
    ('[{"host": "127.0.0.1", "user": "pi"}]', "JSON object"),
    ('{"host": "-oProxyCommand=x", "user": "pi"}', "host"),
    ('{"host": "127.0.0.1", "user": "pi", "emulated": "yes"}', "emulated"),
    ('{"host": 127, "user": "pi"}', "host"),
    ('{"host": "127.0.0.1", ', "not valid JSON"),
])
def test_bad_board_file_is_one_line_naming_the_field(content: str, needle: str, tmp_path: Path, capsys) -> None:
    board = tmp_path / "board.json"
    board.write_text(content)
    code, lines = remote_cli(capsys, "remote", "setup", "--board", board)
    assert code == 2 and len(lines) == 1 and "board.json" in lines[0] and needle in lines[0], lines


def test_local_inputs_of_remote_are_checked_before_connecting(tmp_path: Path, capsys) -> None:
    """A missing local model is named at once; the closed port is never tried."""
    port = free_port()
    knobs = tmp_path / "k.yaml"
    knobs.write_text("layers: {}\n")
    code, lines = remote_cli(capsys, "remote", "eval", "--host", "127.0.0.1", "--user", "pi", "--port", port,
                             tmp_path / "absent.onnx", "--knobs", knobs, "--data-npz", tmp_path / "d.npz",
                             "--json", tmp_path / "r.json")
    assert code == 2 and len(lines) == 1, lines
    assert "absent.onnx" in lines[0] and "not found" in lines[0] and "cannot reach" not in lines[0]
    assert not (tmp_path / "r.json").exists()
