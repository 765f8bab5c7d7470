#!/usr/bin/env python3
"""An emulated Raspberry Pi for tests: an aarch64 Debian bookworm root filesystem run under
qemu-user (binfmt_misc) with its own sshd on 127.0.0.1, reachable like a real board over SSH.

Sub-commands (all need root: binfmt_misc, chroot, mounts):

    build   make the root filesystem once and cache it as a zstd tarball (about 5 min cold)
    start   unpack the cache if needed, start sshd, print and write the board description
            (host, port, user, key, ...) as JSON and YAML under the cache directory
    stop    stop the board by its PID (its mounts go away with its namespace)
    status  say whether the board runs; exit 0 if it does, 1 if not
    clean   stop and delete the unpacked root filesystem (the cached tarball stays)

Times measured on this board are those of an *emulated aarch64* CPU (8-20x slower than the host,
with the host's core count and memory), never Raspberry Pi times; the board description says
``emulated: true`` and the label to use. See docs of the project (pi-emulation notes)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(os.environ.get("PI_EMULATOR_DIR", PROJECT_ROOT / ".pi"))
TARBALL_NAME = "rootfs-bookworm-arm64.tar.zst"
SUITE = "bookworm"
USER = "pi"
HOSTNAME = "raspberrypi"
QEMU_CPU = "cortex-a72"
PREFERRED_PORT = 52222
LABEL = "emulated aarch64"
# Raspberry Pi OS-like userland: Python 3.11 with venv, a C compiler, numpy/scipy from Debian.
PACKAGES = (
    "python3,python3-numpy,python3-scipy,python3-dev,python3-venv,python3-pip,cython3,gcc,"
    "libc6-dev,openssh-server,rsync,ca-certificates"
)
HOST_TOOLS = {  # binary -> Debian package providing it
    "qemu-aarch64-static": "qemu-user-static",
    "debootstrap": "debootstrap",
    "zstd": "zstd",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "rsync": "rsync",
    "unshare": "util-linux",
}
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
BINFMT_NAME = "qemu-aarch64"
BINFMT_INTERPRETER = "/usr/libexec/qemu-binfmt/aarch64-binfmt-P"
BINFMT_MAGIC = r"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
BINFMT_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
SSHD_CONFIG = f"""\
# Written by tools/pi_emulator.py: key authentication only, QEMU CPU model for every session.
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin no
UsePAM no
X11Forwarding no
PrintMotd no
UseDNS no
MaxSessions 64
MaxStartups 64:30:128
SetEnv QEMU_CPU={QEMU_CPU}
"""


class EmulatorError(Exception):
    """A failure of the emulator script, reported as one line."""


@dataclass
class Board:
    """What a client needs to reach the emulated board (written to board.json / board.yaml)."""

    name: str
    host: str
    port: int
    user: str
    key: str
    known_hosts: str
    python: str
    workdir: str
    emulated: bool
    label: str
    pid: int


@dataclass
class Paths:
    """The files the emulator keeps under its cache directory."""

    cache: Path

    @property
    def tarball(self) -> Path:
        return self.cache / TARBALL_NAME

    @property
    def rootfs(self) -> Path:
        return self.cache / "rootfs"

    @property
    def build_dir(self) -> Path:
        return self.cache / "rootfs.build"

    @property
    def key(self) -> Path:
        return self.cache / "key" / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.cache / "known_hosts"

    @property
    def pidfile(self) -> Path:
        return self.cache / "sshd.pid"

    @property
    def log(self) -> Path:
        return self.cache / "sshd.log"

    @property
    def board_json(self) -> Path:
        return self.cache / "board.json"

    @property
    def board_yaml(self) -> Path:
        return self.cache / "board.yaml"


def log(message: str) -> None:
    """Progress on stderr (stdout is kept for the board description)."""
    print(f"pi_emulator: {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
    """Run ``cmd``; raise EmulatorError naming the command (and its last output line) on failure."""
    proc = subprocess.run(cmd, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout or "").strip().splitlines()
        last = lines[-1] if lines else f"exit {proc.returncode}"
        raise EmulatorError(f"{' '.join(cmd[:3])} failed: {last}")
    return proc


def require_root() -> None:
    """binfmt_misc, chroot and mounts need root."""
    if os.geteuid() != 0:
        raise EmulatorError("the emulated Pi needs root (binfmt_misc, chroot, mounts)")


def ensure_host_tools() -> None:
    """Install the host packages the emulator needs (apt-get, as root) when any is missing."""
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    log(f"installing host packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env,
                      capture_output=True).returncode != 0:
        run(["apt-get", "update", "-q"], env=env)
        run(["apt-get", "install", "-y", "-q", *missing], env=env)


def ensure_binfmt() -> None:
    """Mount binfmt_misc and register the aarch64 handler with flags POCF (C keeps setuid working)."""
    if not (BINFMT_DIR / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)])
    entry = BINFMT_DIR / BINFMT_NAME
    if entry.exists():
        text = entry.read_text()
        flags = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("flags:")), "")
        if "enabled" in text and set("POCF") <= set(flags) and BINFMT_INTERPRETER in text:
            return
        entry.write_text("-1")  # unregister a handler with the wrong flags
    if not Path(BINFMT_INTERPRETER).exists():
        raise EmulatorError(f"{BINFMT_INTERPRETER} missing (install qemu-user-static)")
    rule = f":{BINFMT_NAME}:M::{BINFMT_MAGIC}:{BINFMT_MASK}:{BINFMT_INTERPRETER}:POCF"
    (BINFMT_DIR / "register").write_text(rule)


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (first URIs: line), else deb.debian.org."""
    for src in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")):
        for line in src.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    for src in [Path("/etc/apt/sources.list"), *Path("/etc/apt").glob("sources.list.d/*.list")]:
        if src.exists():
            for line in src.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[0] == "deb" and "security" not in line:
                    return next(p for p in parts[1:] if "://" in p)
    return "http://deb.debian.org/debian"


def chroot(rootfs: Path, *cmd: str) -> None:
    """Run ``cmd`` inside ``rootfs`` (aarch64 binaries go through qemu via binfmt)."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "QEMU_CPU": QEMU_CPU,
           "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}
    run(["chroot", str(rootfs), *cmd], env=env)


def configure_rootfs(rootfs: Path) -> None:
    """User ``pi``, sshd (keys only, QEMU_CPU for sessions), host name, CA certificates, DNS."""
    chroot(rootfs, "useradd", "--create-home", "--shell", "/bin/bash", USER)
    chroot(rootfs, "usermod", "-p", "*", USER)  # no password, but not "locked" for sshd
    (rootfs / "etc/ssh/sshd_config.d").mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/ssh/sshd_config.d/pi-emulator.conf").write_text(SSHD_CONFIG)
    if not list((rootfs / "etc/ssh").glob("ssh_host_*_key")):
        chroot(rootfs, "ssh-keygen", "-A")
    (rootfs / "etc/hostname").write_text(HOSTNAME + "\n")
    (rootfs / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n")
    extra_ca = Path("/usr/local/share/ca-certificates")
    if extra_ca.is_dir():
        shutil.copytree(extra_ca, rootfs / "usr/local/share/ca-certificates", dirs_exist_ok=True)
    chroot(rootfs, "update-ca-certificates")
    chroot(rootfs, "apt-get", "clean")
    shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
    (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)


def build(paths: Paths, force: bool = False) -> float:
    """Make the cached tarball (debootstrap two stages + configuration); return seconds taken."""
    require_root()
    if paths.tarball.exists() and not force:
        log(f"cached root filesystem present: {paths.tarball}")
        return 0.0
    ensure_host_tools()
    ensure_binfmt()
    start = time.monotonic()
    paths.cache.mkdir(parents=True, exist_ok=True)
    tree = paths.build_dir
    if tree.exists():
        unmount_all(tree)
        shutil.rmtree(tree)
    mirror = debian_mirror()
    log(f"debootstrap --foreign arm64 {SUITE} from {mirror} (first stage)")
    run(["debootstrap", "--arch=arm64", "--foreign", "--variant=minbase", f"--include={PACKAGES}",
         SUITE, str(tree), mirror])
    shutil.copy2("/usr/bin/qemu-aarch64-static", tree / "usr/bin/qemu-aarch64-static")
    log("debootstrap --second-stage under qemu (the slow part)")
    chroot(tree, "/debootstrap/debootstrap", "--second-stage")
    configure_rootfs(tree)
    log(f"packing {paths.tarball.name}")
    tmp = paths.tarball.with_name(paths.tarball.name + ".tmp")
    with open(tmp, "wb") as out:
        tar = subprocess.Popen(["tar", "-C", str(tree), "--numeric-owner", "-cpf", "-", "."],
                               stdout=subprocess.PIPE)
        zst = subprocess.run(["zstd", "-q", "-T0", "-6"], stdin=tar.stdout, stdout=out)
        tar.stdout.close()  # type: ignore[union-attr]
        if tar.wait() != 0 or zst.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise EmulatorError(f"packing {tree} failed")
    os.replace(tmp, paths.tarball)
    if not paths.rootfs.exists():
        os.replace(tree, paths.rootfs)
    else:
        shutil.rmtree(tree)
    took = time.monotonic() - start
    size = paths.tarball.stat().st_size / 2**20
    log(f"built {paths.tarball} ({size:.0f} MiB) in {took:.0f} s")
    return took


def unpack(paths: Paths) -> None:
    """Replace the live root filesystem with a fresh copy of the cached tarball."""
    if paths.rootfs.exists():
        unmount_all(paths.rootfs)
        shutil.rmtree(paths.rootfs)
    tmp = paths.cache / "rootfs.unpack"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    run(["tar", "-C", str(tmp), "--numeric-owner", "-I", "zstd -T0", "-xpf", str(paths.tarball)])
    os.replace(tmp, paths.rootfs)


def unmount_all(rootfs: Path) -> None:
    """Unmount anything left mounted under ``rootfs`` (deepest first); normally nothing is."""
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        if target == str(rootfs) or target.startswith(str(rootfs) + "/"):
            mounts.append(target)
    for target in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)


def free_port(preferred: int = PREFERRED_PORT) -> int:
    """``preferred`` if it is free on 127.0.0.1, else a port the kernel picks."""
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise EmulatorError("no free TCP port on 127.0.0.1")


def ensure_client_key(paths: Paths, rootfs: Path) -> None:
    """Make the client key once and authorise it for ``pi`` inside the root filesystem."""
    if not paths.key.exists():
        paths.key.parent.mkdir(parents=True, exist_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pi-emulator", "-f", str(paths.key)])
    uid, gid = next((int(f[2]), int(f[3])) for f in
                    (ln.split(":") for ln in (rootfs / "etc/passwd").read_text().splitlines())
                    if f[0] == USER)
    ssh_dir = rootfs / "home" / USER / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    auth = ssh_dir / "authorized_keys"
    auth.write_text(paths.key.with_suffix(".pub").read_text())
    for item, mode in ((ssh_dir, 0o700), (auth, 0o600)):
        os.chown(item, uid, gid)
        os.chmod(item, mode)


def write_known_hosts(paths: Paths, rootfs: Path, host: str, port: int) -> None:
    """Pin the board's host keys for ``[host]:port`` in the project's known_hosts file."""
    pattern = f"[{host}]:{port}"
    keep = []
    if paths.known_hosts.exists():
        keep = [ln for ln in paths.known_hosts.read_text().splitlines()
                if ln and ln.split()[0] != pattern]
    for pub in sorted((rootfs / "etc/ssh").glob("ssh_host_*_key.pub")):
        kind, blob = pub.read_text().split()[:2]
        keep.append(f"{pattern} {kind} {blob}")
    paths.known_hosts.write_text("\n".join(keep) + "\n")


def read_pid(paths: Paths) -> int | None:
    """The board's PID if it is running, else None (a stale PID file is removed)."""
    try:
        pid = int(paths.pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        cmdline = b""
    if b"unshare" not in cmdline:
        paths.pidfile.unlink(missing_ok=True)
        return None
    return pid


def wait_for_ssh(board: Board, timeout: float, proc: subprocess.Popen) -> None:
    """Wait until ``ssh pi@board uname -m`` answers aarch64, or fail naming the log."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmulatorError(f"sshd of the emulated Pi exited; see {board_log_hint(board)}")
        out = subprocess.run(
            ["ssh", "-p", str(board.port), "-i", board.key, "-o", "BatchMode=yes",
             "-o", f"UserKnownHostsFile={board.known_hosts}", "-o", "StrictHostKeyChecking=yes",
             "-o", "ConnectTimeout=5", f"{board.user}@{board.host}", "uname -m"],
            capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip() == "aarch64":
            return
        last = (out.stderr or out.stdout).strip().splitlines()[-1:] or [""]
        last = last[0]
        time.sleep(0.5)
    raise EmulatorError(f"emulated Pi on {board.host}:{board.port} did not answer in {timeout:.0f} s: {last}")


def board_log_hint(board: Board) -> str:
    """Where the sshd log of ``board`` is."""
    return str(Path(board.known_hosts).parent / "sshd.log")


def write_board(paths: Paths, board: Board) -> None:
    """The board description as JSON and as (flat) YAML, each written atomically."""
    data = asdict(board)
    text_json = json.dumps(data, indent=2) + "\n"
    text_yaml = "".join(f"{k}: {json.dumps(v)}\n" for k, v in data.items())
    for target, text in ((paths.board_json, text_json), (paths.board_yaml, text_yaml)):
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)


def start(paths: Paths, fresh: bool = False, port: int | None = None, timeout: float = 60.0) -> Board:
    """Start the board's sshd (building/unpacking first when needed); return its description."""
    require_root()
    pid = read_pid(paths)
    if pid is not None and not fresh:
        board = Board(**json.loads(paths.board_json.read_text()))
        log(f"already running (pid {pid}) on {board.host}:{board.port}")
        return board
    if pid is not None:
        stop(paths)
    ensure_host_tools()
    ensure_binfmt()
    if not paths.tarball.exists():
        build(paths)
    began = time.monotonic()
    if fresh or not paths.rootfs.exists():
        unpack(paths)
    rootfs = paths.rootfs.resolve()
    unmount_all(rootfs)
    ensure_client_key(paths, rootfs)
    port = port or free_port()
    host = "127.0.0.1"
    write_known_hosts(paths, rootfs, host, port)
    (rootfs / "run/sshd").mkdir(parents=True, exist_ok=True)
    # Private mount, UTS and PID namespaces: sshd is PID 1 there, so when it (or unshare, through
    # --kill-child) dies, every session dies with it and the mounts vanish with the namespace.
    script = (
        "set -e; R=\"$1\"; shift; "
        "mount -t proc proc \"$R/proc\"; mount -t sysfs sysfs \"$R/sys\"; "
        "mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts \"$R/dev/pts\"; "
        "rm -f \"$R/dev/ptmx\"; ln -s pts/ptmx \"$R/dev/ptmx\"; "
        "mount -t tmpfs -o mode=1777 tmpfs \"$R/dev/shm\"; "
        f"hostname {HOSTNAME}; exec chroot \"$R\" \"$@\""
    )
    cmd = ["unshare", "--mount", "--uts", "--pid", "--fork", "--kill-child", "--propagation", "private",
           "/bin/sh", "-c", script, "sh", str(rootfs),
           "/usr/sbin/sshd", "-D", "-e", "-p", str(port), "-o", f"ListenAddress={host}"]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "QEMU_CPU": QEMU_CPU}
    paths.log.parent.mkdir(parents=True, exist_ok=True)
    with open(paths.log, "ab") as logf:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True)
    paths.pidfile.write_text(f"{proc.pid}\n")
    board = Board(name="pi-emu", host=host, port=port, user=USER, key=str(paths.key.resolve()),
                  known_hosts=str(paths.known_hosts.resolve()), python="python3",
                  workdir="dyvedeep", emulated=True, label=LABEL, pid=proc.pid)
    try:
        wait_for_ssh(board, timeout, proc)
    except EmulatorError:
        stop(paths)
        raise
    write_board(paths, board)
    log(f"emulated Pi ({LABEL}) on {host}:{port}, pid {proc.pid}, up in {time.monotonic() - began:.1f} s")
    return board


def children_of(pid: int) -> list[int]:
    """The child processes of ``pid``."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def processes_in(rootfs: Path) -> list[int]:
    """PIDs of the processes whose root directory is ``rootfs``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "root") == str(rootfs):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def stop(paths: Paths, timeout: float = 10.0) -> bool:
    """Stop the board by its PID; return whether it was running."""
    pid = read_pid(paths)
    rootfs = paths.rootfs.resolve()
    if pid is not None:
        # unshare ignores SIGTERM while it waits; its child is sshd, PID 1 of the board's PID
        # namespace: killing it kills every process of the board, then unshare exits.
        for child in children_of(pid):
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            try:  # reap it if it is our child (start and stop in one process, as in tests)
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.1)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
    for other in processes_in(rootfs):  # safety net: nothing of the board outlives stop
        try:
            os.kill(other, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if rootfs.exists():
        unmount_all(rootfs)
    paths.pidfile.unlink(missing_ok=True)
    paths.board_json.unlink(missing_ok=True)
    paths.board_yaml.unlink(missing_ok=True)
    return pid is not None


def status(paths: Paths) -> int:
    """Print the board's state; 0 if it runs, 1 if not."""
    pid = read_pid(paths)
    if pid is None:
        cached = "cached" if paths.tarball.exists() else "not built"
        print(f"stopped ({cached})")
        return 1
    print(paths.board_json.read_text() if paths.board_json.exists() else f"running, pid {pid}", end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help="where the tarball, root filesystem, key and board files live (default .pi/)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="build and cache the root filesystem")
    p_build.add_argument("--force", action="store_true", help="rebuild even if cached")
    p_start = sub.add_parser("start", help="start the board; print its description as JSON")
    p_start.add_argument("--fresh", action="store_true", help="unpack a clean root filesystem first")
    p_start.add_argument("--port", type=int, default=None, help="sshd port (default: 52222 or a free one)")
    p_start.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for sshd")
    sub.add_parser("stop", help="stop the board")
    sub.add_parser("status", help="exit 0 if the board runs")
    sub.add_parser("clean", help="stop and delete the unpacked root filesystem")
    args = parser.parse_args(argv)
    paths = Paths(args.cache_dir.resolve())
    try:
        if args.command == "build":
            build(paths, force=args.force)
        elif args.command == "start":
            board = start(paths, fresh=args.fresh, port=args.port, timeout=args.timeout)
            print(json.dumps(asdict(board), indent=2))
        elif args.command == "stop":
            log("stopped" if stop(paths) else "was not running")
        elif args.command == "status":
            return status(paths)
        elif args.command == "clean":
            require_root()
            stop(paths)
            if paths.rootfs.exists():
                shutil.rmtree(paths.rootfs)
    except EmulatorError as err:
        print(f"pi_emulator: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
