#!/usr/bin/env python3
"""A real one-node Slurm cluster on this machine, for the tests of the Slurm profile: munge,
MariaDB (the accounting database), slurmdbd, slurmctld and slurmd, each started in the
foreground as a child of this script's session and stopped by its PID (no systemd).

Sub-commands (root: the daemons run as root, and so do the jobs):

    start   install the Debian packages if missing, write the configuration, start the daemons,
            register the cluster and an account in the database; print the environment a client
            needs (SLURM_CONF) as JSON and write it to <dir>/cluster.json and <dir>/env
    stop    stop the daemons by their PIDs, in reverse order of start
    status  say whether every daemon runs; exit 0 if they do, 1 if not

State (configuration, munge key, database, spool, logs, PIDs) lives under SLURM_CLUSTER_DIR or
.slurm/ of the checkout. The node has this machine's CPUs and memory (`slurmd -C`); one
partition, the default; cgroups are off (proctrack/linuxproc, task/none). While it runs,
/etc/slurm/slurm.conf links to its slurm.conf (Slurm's default place: job steps find it there);
a machine with a slurm.conf of its own is refused."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = Path(os.environ.get("SLURM_CLUSTER_DIR", PROJECT_ROOT / ".slurm"))
CLUSTER = "dyvedeep"
PARTITION = "debug"
ACCOUNT = "dyvedeep"
NODE = "localhost"
DB_USER = "slurm"
DB_NAME = "slurm_acct_db"
# binary -> Debian package providing it
PACKAGES = {
    "munged": "munge",
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "slurmdbd": "slurmdbd",
    "sbatch": "slurm-client",
    "sacct": "slurm-client",
    "mariadbd": "mariadb-server",
}
# Where Slurm's programs look when SLURM_CONF is not set: the executor plugin's job step drops
# SLURM_* variables before it calls `srun`, so the cluster's slurm.conf is linked here.
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
# Start order; stop goes the other way.
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")


class ClusterError(Exception):
    """A failure of the cluster script, reported as one line."""


@dataclass
class Paths:
    """The files the cluster keeps under its directory."""

    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def dbd_conf(self) -> Path:
        return self.root / "etc" / "slurmdbd.conf"  # slurmdbd looks beside SLURM_CONF

    @property
    def munge_key(self) -> Path:
        return self.root / "munge" / "munge.key"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    @property
    def db_dir(self) -> Path:
        return self.root / "db"

    @property
    def db_socket(self) -> Path:
        return self.root / "run" / "mariadb.sock"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def pids(self) -> Path:
        return self.root / "run" / "pids.json"

    @property
    def cluster_json(self) -> Path:
        return self.root / "cluster.json"

    @property
    def env_file(self) -> Path:
        return self.root / "env"


def log(message: str) -> None:
    """Progress on stderr (stdout is kept for the description)."""
    print(f"slurm_cluster: {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], env: dict[str, str] | None = None, input: str | None = None) -> str:
    """Run ``cmd``; raise ClusterError naming it (and its last output line) on failure."""
    proc = subprocess.run(cmd, text=True, capture_output=True, env=env, input=input)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout or "").strip().splitlines()
        raise ClusterError(f"{' '.join(cmd[:3])} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    return proc.stdout


def missing_packages() -> list[str]:
    """The Debian packages whose programs are not on this machine."""
    return sorted({pkg for tool, pkg in PACKAGES.items() if find_program(tool) is None})


def find_program(name: str) -> str | None:
    """``name`` on PATH or in /usr/sbin (daemons live there; root's PATH may lack it)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def ensure_packages() -> None:
    """Install the missing Debian packages (apt-get, as root; `apt-get update` when needed)."""
    missing = missing_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        raise ClusterError(f"missing Debian packages {' '.join(missing)} (install them as root)")
    log(f"installing Debian packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", *missing]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        run(["apt-get", "update", "-q"], env=env)
        run(cmd, env=env)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_hardware() -> tuple[int, int]:
    """(CPUs, RealMemory MB) of this machine as slurmd sees them."""
    out = run([find_program("slurmd") or "slurmd", "-C"])
    cpus = re.search(r"\bCPUs=(\d+)", out)
    memory = re.search(r"\bRealMemory=(\d+)", out)
    if not cpus or not memory:
        raise ClusterError(f"slurmd -C printed no CPUs/RealMemory: {out.strip()[:200]}")
    return int(cpus.group(1)), int(memory.group(1))


def write_config(paths: Paths, ports: dict[str, int], password: str) -> None:
    """slurm.conf and slurmdbd.conf for one node with this machine's CPUs and memory."""
    cpus, memory = node_hardware()
    for d in ("etc", "state", "spool", "log", "run"):
        (paths.root / d).mkdir(parents=True, exist_ok=True)
    r = paths.root
    paths.conf.write_text(f"""\
# Written by tools/slurm_cluster.py: one node, no cgroups, accounting in slurmdbd.
ClusterName={CLUSTER}
SlurmctldHost={NODE}(127.0.0.1)
SlurmctldPort={ports['slurmctld']}
SlurmdPort={ports['slurmd']}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={paths.munge_socket}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={ports['slurmdbd']}
# the munge socket the clients use to reach slurmdbd
AccountingStoragePass={paths.munge_socket}
# sacct shows each job's comment (the executor plugin writes the rule there)
AccountingStoreFlags=job_comment
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
MinJobAge=300
KillWait=5
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
""", encoding="utf-8")
    paths.dbd_conf.write_text(f"""\
# Written by tools/slurm_cluster.py: the accounting daemon over the private MariaDB.
AuthType=auth/munge
AuthInfo=socket={paths.munge_socket}
DbdHost={NODE}
DbdAddr=127.0.0.1
DbdPort={ports['slurmdbd']}
SlurmUser=root
PidFile={r}/run/slurmdbd.pid
LogFile={r}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports['mariadb']}
StorageUser={DB_USER}
StoragePass={password}
StorageLoc={DB_NAME}
""", encoding="utf-8")
    paths.dbd_conf.chmod(0o600)  # slurmdbd refuses a readable password file


def link_system_conf(paths: Paths) -> None:
    """Point /etc/slurm/slurm.conf at this cluster's; refuse to replace a real one."""
    if SYSTEM_CONF.is_symlink():
        target = Path(os.readlink(SYSTEM_CONF))
        if target == paths.conf:
            return
        if target.name == paths.conf.name and not read_pids(Paths(target.parent.parent)):
            SYSTEM_CONF.unlink()  # left by a test cluster (another checkout) that is stopped
    if SYSTEM_CONF.exists() or SYSTEM_CONF.is_symlink():
        raise ClusterError(f"{SYSTEM_CONF} exists and is not this test cluster's: this machine has a Slurm of its own")
    SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SYSTEM_CONF.symlink_to(paths.conf)


def unlink_system_conf(paths: Paths) -> None:
    """Remove /etc/slurm/slurm.conf if it is this cluster's link."""
    if SYSTEM_CONF.is_symlink() and Path(os.readlink(SYSTEM_CONF)) == paths.conf:
        SYSTEM_CONF.unlink()


def client_env(paths: Paths) -> dict[str, str]:
    """The environment of this process plus SLURM_CONF of the cluster."""
    return dict(os.environ, SLURM_CONF=str(paths.conf))


def read_pids(paths: Paths) -> dict[str, int]:
    """{daemon: PID} of the daemons that still run (PIDs checked against /proc)."""
    try:
        recorded = json.loads(paths.pids.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}
    alive = {}
    for name, pid in recorded.items():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if name.encode() in cmdline:
            alive[name] = pid
    return alive


def write_pids(paths: Paths, pids: dict[str, int]) -> None:
    paths.pids.write_text(json.dumps(pids, indent=2) + "\n", encoding="utf-8")


def launch(paths: Paths, name: str, cmd: list[str], pids: dict[str, int]) -> subprocess.Popen:
    """Start one daemon in the foreground, in its own session, output to <log>/<name>.out."""
    out = open(paths.log_dir / f"{name}.out", "ab")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            env=client_env(paths), start_new_session=True, cwd=paths.root)
    out.close()
    pids[name] = proc.pid
    write_pids(paths, pids)
    return proc


def wait_until(what: str, check, proc: subprocess.Popen, log_file: Path, timeout: float = 60.0) -> None:
    """Poll ``check()`` until true; fail naming the daemon's log when it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClusterError(f"{what} exited with {proc.returncode}; see {last_line_hint(log_file)}")
        try:
            if check():
                return
        except (OSError, subprocess.SubprocessError):
            pass
        time.sleep(0.3)
    raise ClusterError(f"{what} not ready after {timeout:.0f} s; see {last_line_hint(log_file)}")


def last_line_hint(log_file: Path) -> str:
    """The log's name and its last line."""
    try:
        lines = log_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except FileNotFoundError:
        return str(log_file)
    return f"{log_file}: {lines[-1]}" if lines else str(log_file)


def quiet_ok(cmd: list[str], env: dict[str, str]) -> bool:
    return subprocess.run(cmd, env=env, capture_output=True, timeout=20).returncode == 0


def start_munge(paths: Paths, pids: dict[str, int]) -> None:
    munge_dir = paths.munge_key.parent
    munge_dir.mkdir(parents=True, exist_ok=True)
    munge_dir.chmod(0o700)
    if not paths.munge_key.exists():
        run([find_program("mungekey") or "mungekey", "--create", f"--keyfile={paths.munge_key}"])
    paths.munge_key.chmod(0o600)
    proc = launch(paths, "munged", [
        find_program("munged") or "munged", "--foreground", "--force",
        f"--socket={paths.munge_socket}", f"--key-file={paths.munge_key}",
        f"--log-file={paths.log_dir / 'munged.log'}", f"--pid-file={paths.run_dir / 'munged.pid'}",
        f"--seed-file={munge_dir / 'munged.seed'}"], pids)
    env = client_env(paths)
    wait_until("munged", lambda: quiet_ok(["munge", "-n", "-S", str(paths.munge_socket)], env),
               proc, paths.log_dir / "munged.log")


def start_mariadb(paths: Paths, pids: dict[str, int], port: int, password: str) -> None:
    fresh = not (paths.db_dir / "mysql").is_dir()
    if fresh:
        paths.db_dir.mkdir(parents=True, exist_ok=True)
        run([shutil.which("mariadb-install-db") or "mariadb-install-db", "--no-defaults",
             f"--datadir={paths.db_dir}", "--user=root", "--auth-root-authentication-method=socket",
             "--skip-test-db"])
    proc = launch(paths, "mariadbd", [
        find_program("mariadbd") or "mariadbd", "--no-defaults", f"--datadir={paths.db_dir}",
        f"--socket={paths.db_socket}", f"--pid-file={paths.run_dir / 'mariadbd.pid'}",
        f"--port={port}", "--bind-address=127.0.0.1", "--user=root",
        f"--log-error={paths.log_dir / 'mariadb.log'}", "--innodb-buffer-pool-size=64M",
        "--innodb-lock-wait-timeout=900"], pids)
    client = [shutil.which("mariadb") or "mariadb", "--no-defaults", f"--socket={paths.db_socket}", "-u", "root"]
    wait_until("mariadbd", lambda: quiet_ok([*client, "-e", "SELECT 1"], dict(os.environ)),
               proc, paths.log_dir / "mariadb.log")
    run([*client], input=(
        f"CREATE USER IF NOT EXISTS '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{password}';\n"
        f"ALTER USER '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{password}';\n"
        f"GRANT ALL ON {DB_NAME}.* TO '{DB_USER}'@'127.0.0.1';\n"
        "FLUSH PRIVILEGES;\n"))


def sacctmgr(paths: Paths, *args: str) -> str:
    return run(["sacctmgr", "-i", *args], env=client_env(paths))


def register_accounting(paths: Paths) -> None:
    """The cluster, an account, and root in it as its default account."""
    if CLUSTER not in sacctmgr(paths, "-n", "-P", "list", "cluster", "format=cluster"):
        sacctmgr(paths, "add", "cluster", CLUSTER)
    if ACCOUNT not in sacctmgr(paths, "-n", "-P", "list", "account", "format=account"):
        sacctmgr(paths, "add", "account", ACCOUNT, f"Cluster={CLUSTER}",
                 "Description=DyVEDeep tests", "Organization=dyvedeep")
    users = sacctmgr(paths, "-n", "-P", "list", "association", f"cluster={CLUSTER}", "format=account,user")
    if f"{ACCOUNT}|root" not in users.split():
        sacctmgr(paths, "add", "user", "root", f"Account={ACCOUNT}", f"Cluster={CLUSTER}")
    sacctmgr(paths, "modify", "user", "root", "set", f"DefaultAccount={ACCOUNT}")


def node_idle(paths: Paths) -> bool:
    out = run(["sinfo", "-h", "-N", "-o", "%N %t"], env=client_env(paths))
    return any(line.split()[1:] in (["idle"], ["mix"], ["alloc"]) for line in out.splitlines())


def describe(paths: Paths) -> dict[str, object]:
    cpus, memory = node_hardware()
    return {"slurm_conf": str(paths.conf), "cluster": CLUSTER, "partition": PARTITION,
            "account": ACCOUNT, "node": NODE, "cpus": cpus, "memory_mb": memory,
            "pids": read_pids(paths)}


def start(paths: Paths) -> dict[str, object]:
    """Start the whole cluster (or report the one that runs); its description."""
    if os.geteuid() != 0:
        raise ClusterError("the test cluster needs root (its daemons and jobs run as root)")
    running = read_pids(paths)
    if set(running) == set(DAEMONS):
        log(f"already running: {running}")
        return describe(paths)
    if running:
        stop(paths)
    ensure_packages()
    paths.root.mkdir(parents=True, exist_ok=True)
    for d in ("log", "run"):
        (paths.root / d).mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    ports = {name: free_port() for name in ("slurmctld", "slurmd", "slurmdbd", "mariadb")}
    password = os.urandom(12).hex()
    write_config(paths, ports, password)
    link_system_conf(paths)
    pids: dict[str, int] = {}
    write_pids(paths, pids)
    env = client_env(paths)
    try:
        start_munge(paths, pids)
        start_mariadb(paths, pids, ports["mariadb"], password)
        dbd = launch(paths, "slurmdbd", [find_program("slurmdbd") or "slurmdbd", "-D"], pids)
        wait_until("slurmdbd", lambda: quiet_ok(["sacctmgr", "-n", "list", "cluster"], env),
                   dbd, paths.log_dir / "slurmdbd.log")
        register_accounting(paths)
        ctld = launch(paths, "slurmctld", [find_program("slurmctld") or "slurmctld", "-D", "-i"], pids)
        wait_until("slurmctld", lambda: quiet_ok(["scontrol", "ping"], env) and quiet_ok(["sinfo"], env),
                   ctld, paths.log_dir / "slurmctld.log")
        slurmd = launch(paths, "slurmd", [find_program("slurmd") or "slurmd", "-D", "-N", NODE], pids)
        wait_until("slurmd (node idle)", lambda: node_idle(paths), slurmd, paths.log_dir / "slurmd.log")
    except ClusterError:
        stop(paths)
        raise
    desc = describe(paths)
    paths.cluster_json.write_text(json.dumps(desc, indent=2) + "\n", encoding="utf-8")
    paths.env_file.write_text(f"export SLURM_CONF={paths.conf}\n", encoding="utf-8")
    log(f"cluster {CLUSTER} up in {time.monotonic() - began:.1f} s: node {NODE} with "
        f"{desc['cpus']} CPUs, {desc['memory_mb']} MB; SLURM_CONF={paths.conf}")
    return desc


def stop(paths: Paths, timeout: float = 15.0) -> bool:
    """Stop the daemons by PID (SIGTERM, then SIGKILL after ``timeout``); True if any ran."""
    pids = read_pids(paths)
    for name in reversed(DAEMONS):
        pid = pids.get(name)
        if pid is None:
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break
            except ChildProcessError:
                pass  # not our child (started by an earlier `start`): poll /proc
            time.sleep(0.1)
        if Path(f"/proc/{pid}").exists() and read_pids(paths).get(name) == pid:
            os.kill(pid, signal.SIGKILL)
    paths.pids.unlink(missing_ok=True)
    unlink_system_conf(paths)
    return bool(pids)


def status(paths: Paths) -> int:
    """Print the state; 0 if every daemon runs, 1 if not."""
    pids = read_pids(paths)
    if set(pids) == set(DAEMONS):
        print(json.dumps(describe(paths), indent=2))
        return 0
    down = [d for d in DAEMONS if d not in pids]
    print(f"stopped: {', '.join(down)}" + (f"; running: {pids}" if pids else ""))
    return 1


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                        help="where configuration, database, logs and PIDs live (default .slurm/)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("start", help="start the cluster; print its description as JSON")
    sub.add_parser("stop", help="stop the cluster")
    sub.add_parser("status", help="exit 0 if the cluster runs")
    args = parser.parse_args(argv)
    paths = Paths(args.dir.resolve())
    try:
        if args.command == "start":
            print(json.dumps(start(paths), indent=2))
        elif args.command == "stop":
            log("stopped" if stop(paths) else "was not running")
        else:
            return status(paths)
    except ClusterError as err:
        print(f"slurm_cluster: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
