"""The board over SSH (``dyvedeep remote``): ship the engine to a remote board (a Raspberry Pi, or
the emulated one of tools/pi_emulator.py) as a source distribution, build it there once per engine
version in a virtual environment, and run ``dyvedeep eval`` / ``dyvedeep bench`` there on copies
of the models, knob files and test data; the JSON results come back with a ``platform`` field.

The board needs only sshd, Python 3 with venv, a C compiler and numpy/scipy (from pip or the
system): no Snakemake, no shared filesystem, not even scp or rsync (files travel through ``ssh``'s
standard streams). Connections use the system ``ssh`` with BatchMode, a connect timeout, a
per-project known_hosts file (accept-new) and connection sharing (ControlMaster). A board that
cannot be reached is tried once more, then the command fails with one line naming host:port.

Layout on the board, under the work directory (default ``~/dyvedeep``)::

    sdist/dyvedeep-<version>.tar.gz    the engine's source as shipped
    venvs/<version>/                   its virtual environment; ``.dyvedeep-ready`` marks it built
    files/<sha256>/<name>              inputs, stored by content (copied once)
    runs/<id>/                         one command's outputs (removed after the result is copied)
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.resources
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Sequence

from .errors import DyveError
from .io_utils import read_text_limited, write_json_atomic

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Files of the source distribution, relative to the project root (the engine version hashes them).
SDIST_TOP_FILES = ("pyproject.toml", "setup.py", "README.md", "MANIFEST.in", "LICENSE")
SDIST_PACKAGE_SUFFIXES = (".py", ".pyx", ".pxd", ".proto", ".yaml", ".h", ".csv")
# Not shipped: the transport itself (the board never runs it), so that changing it is no new engine.
SDIST_EXCLUDE = ("dyvedeep/remote.py", "dyvedeep/board_setup.py")
VERSION_LENGTH = 16  # hex digits of the engine hash used in names on the board
READY_MARKER = ".dyvedeep-ready"
KEEP_BUILDS = 3  # engine builds kept on a board (older ones are removed after a new build)
RESULT_MARKER = "@@dyvedeep-result@@"
DEFAULT_WORKDIR = "~/dyvedeep"
DEFAULT_KNOWN_HOSTS = Path(".pi") / "known_hosts"
CONNECT_TIMEOUT_S = 10
SSH_CONNECTION_ERROR = 255  # ssh's exit status for its own failures
RETRY_DELAY_S = 1.0
# Build requirements installed into the board's venv first (the engine is then built without
# build isolation, against the board's numpy; a system setuptools in range is used as it is).
# setuptools < 72: with Debian's python3-scipy, Cython imports pythran, which imports
# numpy.distutils (numpy 1.24), which needs distutils.msvccompiler (gone in setuptools 74) and the
# old compiler constructor (changed in setuptools 80).
PIP_BUILD_REQUIREMENTS = ("setuptools>=61,<72", "wheel", "cython>=3.0", "numpy>=1.24", "scipy>=1.10")
ONNXRUNTIME_REQUIREMENT = "onnxruntime>=1.16"


@dataclass(frozen=True)
class Board:
    """One remote platform: how to reach it and where the engine lives on it."""

    host: str
    user: str
    port: int = 22
    key: str | None = None
    python: str = "python3"
    workdir: str = DEFAULT_WORKDIR
    name: str | None = None
    known_hosts: str = str(DEFAULT_KNOWN_HOSTS)
    emulated: bool = False
    connect_timeout: int = CONNECT_TIMEOUT_S

    @property
    def address(self) -> str:
        """``host:port``, as named in error messages."""
        return f"{self.host}:{self.port}"

    @property
    def platform_name(self) -> str:
        """The name results are filed under (the board's name, else its host)."""
        return self.name or self.host

    @property
    def remote_workdir(self) -> str:
        """The work directory as a path relative to the login directory, or absolute."""
        workdir = self.workdir.rstrip("/") or "/"
        if workdir == "~":
            return "."
        if workdir.startswith("~/"):
            return workdir[2:]
        return workdir


@dataclass
class Sdist:
    """A reproducible source distribution of the local project."""

    version: str  # sha256 (shortened) of the file names and contents, independent of timestamps
    data: bytes  # the .tar.gz, with fixed timestamps and owners

    @property
    def filename(self) -> str:
        return f"dyvedeep-{self.version}.tar.gz"


@dataclass
class SetupResult:
    """What ``setup`` found or did on the board."""

    version: str
    machine: str
    built: bool
    seconds: float
    onnxruntime: bool | None = None
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# The source distribution and the engine version


def sdist_files(root: Path = PROJECT_ROOT) -> list[Path]:
    """The project files that make up the engine's source distribution, sorted."""
    files = [root / name for name in SDIST_TOP_FILES if (root / name).is_file()]
    for path in sorted((root / "dyvedeep").rglob("*")):
        rel = path.relative_to(root)
        if (path.is_file() and path.suffix in SDIST_PACKAGE_SUFFIXES and "__pycache__" not in rel.parts
                and rel.as_posix() not in SDIST_EXCLUDE):
            files.append(path)
    if not (root / "setup.py").is_file() or not (root / "pyproject.toml").is_file():
        raise DyveError(f"{root}: not the dyvedeep project (pyproject.toml and setup.py needed)")
    return files


def build_sdist(root: Path = PROJECT_ROOT) -> Sdist:
    """Tar the engine's sources (fixed timestamps and owners) and hash their contents."""
    entries: list[tuple[str, bytes]] = [
        (str(path.relative_to(root)).replace(os.sep, "/"), path.read_bytes()) for path in sdist_files(root)
    ]
    if "README.md" not in {name for name, _ in entries}:  # pyproject.toml names it as the readme
        entries.insert(0, ("README.md", b"DyVEDeep engine (source shipped to a remote board).\n"))
    entries.sort()
    digest = hashlib.sha256()
    for name, content in entries:
        digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    version = digest.hexdigest()[:VERSION_LENGTH]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in entries:
            info = tarfile.TarInfo(f"dyvedeep-{version}/{name}")
            info.size, info.mtime, info.mode = len(content), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(content))
    packed = io.BytesIO()
    with gzip.GzipFile(fileobj=packed, mode="wb", mtime=0, filename="") as gz:
        gz.write(raw.getvalue())
    return Sdist(version=version, data=packed.getvalue())


def engine_version(root: Path = PROJECT_ROOT) -> str:
    """The engine version: the shortened sha256 of the source distribution's contents."""
    return build_sdist(root).version


# --------------------------------------------------------------------------------------------
# Transport: the system ssh, with connection sharing


def ssh_base(board: Board) -> list[str]:
    """The ``ssh`` command line (without the remote command) for ``board``."""
    cmd = [
        "ssh", "-p", str(board.port),
        "-o", "BatchMode=yes",
        "-o", f"ConnectTimeout={board.connect_timeout}",
        "-o", "StrictHostKeyChecking=accept-new",
        "-o", f"UserKnownHostsFile={Path(board.known_hosts).expanduser().resolve()}",
        "-o", "ControlMaster=auto",
        "-o", "ControlPath=/tmp/dyve-ssh-%C",
        "-o", "ControlPersist=120",
        "-o", "ServerAliveInterval=5",
        "-o", "ServerAliveCountMax=3",
        "-o", "LogLevel=ERROR",
    ]
    if board.key:
        cmd += ["-i", str(Path(board.key).expanduser()), "-o", "IdentitiesOnly=yes"]
    return cmd + [f"{board.user}@{board.host}"]


def check_local_files(board: Board) -> None:
    """Fail early, naming the file, when the key is missing; create the known_hosts folder."""
    if board.key and not Path(board.key).expanduser().is_file():
        raise DyveError(f"{board.key}: SSH key for {board.address} not found")
    Path(board.known_hosts).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _pump_stderr(stream: IO[bytes], tail: list[str], echo: bool) -> None:
    """Copy ``stream`` to our stderr (when ``echo``) line by line, remembering the last lines."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace")
        if line.strip():
            tail.append(line.strip())
            del tail[:-20]
        if echo:
            sys.stderr.write(line)
            sys.stderr.flush()
    stream.close()


def _ssh_once(board: Board, command: str, stdin: bytes | Path | None, echo: bool) -> tuple[int, bytes, list[str]]:
    """Run ``command`` on ``board`` once; return (exit status, stdout, last lines of stderr).

    ssh's own messages go to a log file (``-E``), so that stderr carries only the board's output;
    when ssh itself failed (status 255) its last logged line is returned last instead.
    """
    tail: list[str] = []
    source: IO[bytes] | None = open(stdin, "rb") if isinstance(stdin, Path) else None
    fd, ssh_log = tempfile.mkstemp(prefix="dyvedeep-ssh-", suffix=".log")
    os.close(fd)
    try:
        base = ssh_base(board)
        proc = subprocess.Popen(
            [*base[:-1], "-E", ssh_log, base[-1], command],
            stdin=source if source is not None else (subprocess.PIPE if stdin is not None else subprocess.DEVNULL),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
    except FileNotFoundError as err:
        os.unlink(ssh_log)
        raise DyveError(f"ssh not found (install openssh-client) to reach {board.address}") from err
    try:
        pump = threading.Thread(target=_pump_stderr, args=(proc.stderr, tail, echo), daemon=True)
        pump.start()
        if isinstance(stdin, bytes):
            writer = threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True)
            writer.start()
        out = proc.stdout.read()  # type: ignore[union-attr]
        code = proc.wait()
        pump.join(timeout=5)
        if code == SSH_CONNECTION_ERROR:
            logged = [ln.strip() for ln in Path(ssh_log).read_text(errors="replace").splitlines() if ln.strip()]
            tail.extend(logged[-1:])
        return code, out, tail
    finally:
        if source is not None:
            source.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.unlink(ssh_log)


def _feed(pipe: IO[bytes], data: bytes) -> None:
    """Write ``data`` to ``pipe`` and close it (ignoring a peer that went away)."""
    try:
        pipe.write(data)
        pipe.close()
    except (BrokenPipeError, OSError):
        pass


def ssh(board: Board, command: str, *, stdin: bytes | Path | None = None, echo: bool = True,
        what: str | None = None) -> bytes:
    """Run the shell ``command`` on ``board`` and return its stdout.

    Its stderr streams through to ours when ``echo``. A connection failure (ssh's status 255) is
    retried once, then raises ``DyveError("cannot reach HOST:PORT as USER: <ssh's last line>")``;
    a failing remote command raises a one-line DyveError naming the host and ``what`` it was.
    """
    check_local_files(board)
    for attempt in range(2):
        code, out, tail = _ssh_once(board, command, stdin, echo)
        if code != SSH_CONNECTION_ERROR:
            break
        if attempt == 0:  # once more, on a fresh connection
            close(board)
            time.sleep(RETRY_DELAY_S)
    else:
        last = tail[-1] if tail else "ssh failed without a message"
        raise DyveError(f"cannot reach {board.address} as {board.user}: {last}")
    if code != 0:
        last = tail[-1] if tail else "no message"
        label = what or command.split("&&")[-1].strip()[:60]
        raise DyveError(f"{board.address}: {label} failed on the board (exit {code}): {last}")
    return out


def close(board: Board) -> None:
    """Stop the shared connection to ``board`` (if any)."""
    subprocess.run([*ssh_base(board)[:-1], "-O", "exit", f"{board.user}@{board.host}"],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def q(path: str) -> str:
    """Quote ``path`` for the remote shell."""
    return shlex.quote(path)


def upload(board: Board, source: bytes | Path, remote_path: str, what: str) -> None:
    """Copy ``source`` (bytes or a local file) to ``remote_path``, atomically, over ssh."""
    tmp = f"{remote_path}.tmp{uuid.uuid4().hex[:8]}"
    parent = remote_path.rsplit("/", 1)[0] if "/" in remote_path else "."
    ssh(board, f"mkdir -p {q(parent)} && cat > {q(tmp)} && mv -f {q(tmp)} {q(remote_path)}",
        stdin=source, what=f"copying {what}")


def file_sha256(path: Path) -> str:
    """The sha256 of a local file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def push_files(board: Board, files: Sequence[Path]) -> dict[Path, str]:
    """Copy local ``files`` to the board's content store (skipping those already there).

    Returns each local path's location on the board, relative to the work directory.
    """
    located: dict[Path, str] = {}
    for path in files:
        if not path.is_file():
            raise DyveError(f"{path}: no such file")
        located[path] = f"files/{file_sha256(path)}/{path.name}"
    wd = board.remote_workdir
    listing = " ".join(q(f"{wd}/{rel}") for rel in located.values())
    present = set(ssh(board, f"for f in {listing}; do if test -f \"$f\"; then echo \"$f\"; fi; done",
                      what="listing stored files").decode().split("\n"))
    for path, rel in located.items():
        if f"{wd}/{rel}" not in present:
            upload(board, path, f"{wd}/{rel}", str(path))
    return located


# --------------------------------------------------------------------------------------------
# Setup: build the engine on the board once per version

def board_setup_script() -> bytes:
    """The script ``setup`` runs on the board under its system Python (``board_setup.py``)."""
    return importlib.resources.files(__package__).joinpath("board_setup.py").read_bytes()


def project_dependencies(root: Path = PROJECT_ROOT) -> list[str]:
    """The ``[project] dependencies`` of ``root``'s pyproject.toml (none if it cannot be read)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: pip resolves them while installing the engine instead
        return []
    try:
        with open(root / "pyproject.toml", "rb") as fh:
            deps = tomllib.load(fh).get("project", {}).get("dependencies", [])
    except (OSError, ValueError):
        return []
    return [str(d) for d in deps]


def venv_dir(board: Board, version: str) -> str:
    """The engine's virtual environment on the board."""
    return f"{board.remote_workdir}/venvs/{version}"


def check_installed(board: Board, version: str) -> tuple[bool, str]:
    """One round trip: is engine ``version`` built on the board, and what is its ``uname -m``."""
    marker = f"{venv_dir(board, version)}/{READY_MARKER}"
    out = ssh(board, f"if test -f {q(marker)}; then echo ready; else echo missing; fi; uname -m",
              what="checking the engine").decode().split()
    if len(out) < 2:
        raise DyveError(f"{board.address}: unexpected answer to the engine check: {' '.join(out)!r}")
    return out[0] == "ready", out[1]


def setup(board: Board, root: Path = PROJECT_ROOT, onnxruntime: bool = True,
          build_requirements: Sequence[str] = PIP_BUILD_REQUIREMENTS) -> SetupResult:
    """Make sure the board has the engine of ``root`` built (idempotent; a rebuild only on change).

    A missing build makes ``<workdir>/venvs/<version>`` (with the system site packages, so that
    the board's numpy/scipy serve; without its own pip where the system has one), pip installs ``build_requirements`` and the engine there
    (without build isolation), then onnxruntime if ``onnxruntime`` and pip can get it.
    """
    started = time.monotonic()
    sdist = build_sdist(root)
    ready, machine = check_installed(board, sdist.version)
    if ready:
        return SetupResult(sdist.version, machine, built=False, seconds=time.monotonic() - started)
    print(f"dyvedeep: {board.address}: building engine {sdist.version} on the board ({machine})",
          file=sys.stderr, flush=True)
    remote_sdist = f"{board.remote_workdir}/sdist/{sdist.filename}"
    upload(board, sdist.data, remote_sdist, sdist.filename)
    # The engine's own dependencies go in with the build requirements, so that the extension is
    # compiled against the numpy it will run with.
    requirements = [*build_requirements, *project_dependencies(root)] if build_requirements else []
    args = " ".join(q(a) for a in (board.remote_workdir, sdist.version, remote_sdist,
                                   " ".join(requirements),
                                   ONNXRUNTIME_REQUIREMENT if onnxruntime else "", str(KEEP_BUILDS)))
    out = ssh(board, f"{q(board.python)} - {args}", stdin=board_setup_script(),
              what=f"building engine {sdist.version}")
    info = _last_json(out, board, "setup")
    return SetupResult(sdist.version, info.get("machine", machine), built=bool(info.get("built")),
                       seconds=time.monotonic() - started, onnxruntime=info.get("onnxruntime"), info=info)


def _last_json(out: bytes, board: Board, what: str) -> dict[str, Any]:
    """The JSON object on the last non-empty line of ``out``."""
    lines = [ln for ln in out.decode("utf-8", "replace").splitlines() if ln.strip()]
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError) as err:
        raise DyveError(f"{board.address}: no JSON result from remote {what}") from err


# --------------------------------------------------------------------------------------------
# Remote eval / bench


def run_engine(board: Board, command: str, model: Path, knobs: Path, data: Path | None,
               options: Sequence[str], platform_name: str | None = None,
               root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """Run ``dyvedeep COMMAND`` on the board on copies of the inputs; return its JSON result.

    ``command`` is ``eval`` or ``bench``; ``options`` are further engine options, passed as they are.
    The result's ``platform`` is {name, machine, emulated, host} of the board.
    """
    inputs = [model, knobs] + ([data] if data is not None else [])
    for path in inputs:  # before connecting: a missing input is a local mistake, not the board's
        if not Path(path).is_file():
            raise DyveError(f"{path}: file not found (needed by remote {command})")
    result = setup(board, root=root)
    located = push_files(board, inputs)
    run_dir = f"runs/{uuid.uuid4().hex[:12]}"
    argv = [f"venvs/{result.version}/bin/dyvedeep", command, located[model], "--knobs", located[knobs]]
    if data is not None:
        argv += ["--data", f"npz:{located[data]}"]
    argv += [*options, "--json", f"{run_dir}/out.json"]
    remote = (f"cd {q(board.remote_workdir)} && mkdir -p {run_dir} && "
              f"{{ {' '.join(q(a) for a in argv)} 1>&2 && echo {RESULT_MARKER} && cat {run_dir}/out.json; }}; "
              f"status=$?; rm -rf {run_dir}; exit $status")
    out = ssh(board, remote, what=f"dyvedeep {command} {model.name}")
    try:  # whatever a login script printed comes before the marker
        obj = json.loads(out.decode("utf-8").rsplit(RESULT_MARKER + "\n", 1)[-1])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DyveError(f"{board.address}: dyvedeep {command} {model.name} returned no valid JSON") from err
    back = {located[p]: str(p) for p in inputs}
    back.update({f"npz:{located[data]}": f"npz:{data}"} if data is not None else {})
    for key, value in list(obj.items()):  # name the local inputs, not their copies on the board
        if isinstance(value, str) and value in back:
            obj[key] = back[value]
    obj["platform"] = {"name": platform_name or board.platform_name, "machine": result.machine,
                       "emulated": board.emulated, "host": board.host}
    return obj


# --------------------------------------------------------------------------------------------
# Command line


BOARD_FILE_MAX_BYTES = 64 << 10
BOARD_TEXT_FIELDS = ("host", "user", "key", "python", "workdir", "name", "known_hosts")
# Host and user go onto ssh's command line: no spaces, no leading '-' (ssh would read an option).
_SSH_WORD = re.compile(r"[A-Za-z0-9_.:%@\[\]-]+")


def read_board_file(path: Path) -> dict[str, Any]:
    """The JSON object of a board file (size, encoding and type checked; one line otherwise)."""
    text = read_text_limited(path, BOARD_FILE_MAX_BYTES, "a board description")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise DyveError(f"{path}: not valid JSON ({str(err)[:80]})") from None
    if not isinstance(data, dict):
        raise DyveError(f"{path}: a board description is a JSON object, not {type(data).__name__}")
    return data


def check_board_values(values: dict[str, Any], origin: str) -> dict[str, Any]:
    """Validate the connection fields (from ``origin``: a board file or the options)."""
    for key in BOARD_TEXT_FIELDS:
        value = values.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value or len(value) > 4096 or not value.isprintable():
            raise DyveError(f"{origin}: {key} must be a non-empty printable string, got {repr(value)[:40]}")
    for key in ("host", "user"):
        value = values.get(key)
        if value is not None and (not _SSH_WORD.fullmatch(value) or value.startswith("-")):
            raise DyveError(f"{origin}: {key} {value[:40]!r} is not a host or user name ssh accepts")
    port = values.get("port", 22)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise DyveError(f"{origin}: port must be an integer in 1..65535, got {repr(port)[:40]}")
    if not isinstance(values.get("emulated", False), bool):
        raise DyveError(f"{origin}: emulated must be true or false, got {repr(values['emulated'])[:40]}")
    return values


def board_from_args(args: argparse.Namespace) -> Board:
    """The Board named by ``--board FILE`` and/or the explicit connection options, validated
    before anything connects."""
    fields = ("host", "port", "user", "key", "python", "workdir", "name", "known_hosts")
    values: dict[str, Any] = {}
    if args.board:
        base = read_board_file(Path(args.board))
        values = check_board_values({k: base[k] for k in (*fields, "emulated") if base.get(k) is not None},
                                    str(args.board))
    options = {k: getattr(args, k) for k in fields if getattr(args, k, None) is not None}
    values.update(check_board_values(options, "dyvedeep remote"))
    values["emulated"] = bool(args.emulated or values.get("emulated", False))
    for needed in ("host", "user"):
        if not values.get(needed):
            raise DyveError(f"dyvedeep remote: --{needed} (or --board FILE) is required")
    values.setdefault("port", 22)
    values.setdefault("workdir", DEFAULT_WORKDIR)
    return Board(**values)


def _add_board_options(parser: argparse.ArgumentParser) -> None:
    """The options that say how to reach a board."""
    g = parser.add_argument_group("board")
    g.add_argument("--board", help="JSON board description (e.g. .pi/board.json from tools/pi_emulator.py)")
    g.add_argument("--host", help="the board's host name or address")
    g.add_argument("--port", type=int, help="sshd port (default 22)")
    g.add_argument("--user", help="login user")
    g.add_argument("--key", help="private key file")
    g.add_argument("--python", help="Python on the board (default python3)")
    g.add_argument("--workdir", help=f"work directory on the board (default {DEFAULT_WORKDIR})")
    g.add_argument("--name", help="platform name (default: the host)")
    g.add_argument("--known-hosts", dest="known_hosts",
                   help=f"known_hosts file for boards (default {DEFAULT_KNOWN_HOSTS})")
    g.add_argument("--emulated", action="store_true", help="the board is emulated (label its times so)")


def cmd_setup(args: argparse.Namespace) -> int:
    """``dyvedeep remote setup``."""
    board = board_from_args(args)
    result = setup(board, onnxruntime=not args.no_onnxruntime)
    state = "built" if result.built else "already installed"
    extra = f", onnxruntime {'yes' if result.onnxruntime else 'no'}" if result.built else ""
    print(f"{board.platform_name} ({board.address}, {result.machine}): engine {result.version} {state}"
          f" in {result.seconds:.1f} s{extra}")
    if args.json:
        write_json_atomic(args.json, {"platform": board.platform_name, "host": board.host, "port": board.port,
                                      "machine": result.machine, "emulated": board.emulated,
                                      "version": result.version, "built": result.built,
                                      "seconds": round(result.seconds, 1), **result.info})
    return 0


def _engine_options(args: argparse.Namespace) -> list[str]:
    """Engine options common to eval and bench, plus the free-form ``--engine-args``."""
    options: list[str] = []
    if getattr(args, "limit", None) is not None:
        options += ["--limit", str(args.limit)]
    if getattr(args, "threads", None) is not None:
        options += ["--threads", str(args.threads)]
    return options + shlex.split(args.engine_args or "")


def cmd_run(args: argparse.Namespace) -> int:
    """``dyvedeep remote eval`` and ``dyvedeep remote bench``."""
    board = board_from_args(args)
    data = Path(args.data_npz) if args.data_npz else None
    obj = run_engine(board, args.remote_command, Path(args.model), Path(args.knobs), data,
                     _engine_options(args), args.platform_name)
    write_json_atomic(args.json, obj)
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    """``dyvedeep remote version``: the local engine version (what setup would install)."""
    print(engine_version())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``dyvedeep remote`` (setup, eval, bench, version)."""
    parser = subparsers.add_parser("remote", help="build and run the engine on a board over SSH",
                                   description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="remote_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("setup", help="build the local engine on the board (once per engine version)")
    _add_board_options(p)
    p.add_argument("--no-onnxruntime", action="store_true", help="do not try to pip install onnxruntime")
    p.add_argument("--json", help="also write what was found/done as JSON here")
    p.set_defaults(func=cmd_setup)

    for name, helptext in (("eval", "accuracy and op counts on the board"),
                           ("bench", "latency on the board")):
        p = sub.add_parser(name, help=helptext)
        _add_board_options(p)
        p.add_argument("model", help="ONNX model")
        p.add_argument("--knobs", required=True, help="knob file (thresholds calibrated on the host)")
        p.add_argument("--data-npz", required=(name == "eval"), help="test data (.npz) to copy over")
        p.add_argument("--json", required=True, help="where to write the result")
        p.add_argument("--platform-name", help="platform name in the result (default: board name or host)")
        if name == "eval":
            p.add_argument("--limit", type=int, help="first N images only")
        p.add_argument("--threads", type=int, required=(name == "bench"), help="engine threads")
        p.add_argument("--engine-args", help="further options for the engine on the board (one quoted string)")
        p.set_defaults(func=cmd_run)

    p = sub.add_parser("version", help="print the local engine version (hash of its sources)")
    p.set_defaults(func=cmd_version)
