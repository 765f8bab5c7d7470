"""Run one `dyvedeep remote` step (setup, eval or bench) on a board over SSH.

A failure on an attempt before the last fails the job (Snakemake retries it); after the last
attempt the output gets {"status": "missing", "reason": <one line>} instead, so an unreachable
board gives "missing" rows in the report and never stops the host's results. Eval and bench
on a board whose setup is missing are missing at once (no new connection attempts)."""
import shlex
import subprocess
import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821
from _common import last_error_line, read_json, say  # noqa: E402
from dyvedeep.io_utils import write_json_atomic  # noqa: E402

sm = snakemake  # noqa: F821
mode = sm.params.mode
ssh = sm.params.ssh
out = sm.output[0]
attempt = int(sm.resources.remote_attempt)
last_attempt = attempt > sm.params.retries
platform = {"name": ssh["name"], "emulated": bool(ssh["emulated"])}
what = f"platform {ssh['name']} {mode}" + (f" of {sm.wildcards.bench}" if mode != "setup" else "")
log = open(sm.log[0], "a", encoding="utf-8")
print(f"--- attempt {attempt} of {sm.params.retries + 1}", file=log, flush=True)


class Failed(Exception):
    """The step failed; the message is the one-line reason."""


def missing(reason):
    say(f"dyvedeep: {what} missing: {reason}")
    write_json_atomic(out, {"status": "missing", "reason": reason, "platform": platform})


def run():
    """Run the step; True when done, False when the board is known to be missing."""
    if mode != "setup":
        setup = read_json(sm.input.setup)
        if setup.get("status") != "ok":
            missing(f"board not available: {setup.get('reason', '')}")
            return
    cmd = shlex.split(sm.params.dyvedeep) + ["remote", mode, "--name", ssh["name"]]
    for key, value in ssh["options"].items():
        cmd += [f"--{key}", str(value)]
    if ssh["emulated"]:
        cmd += ["--emulated"]
    if mode != "setup":
        cmd += [sm.input.model, "--knobs", sm.input.knobs]
        if mode == "bench":
            cmd += ["--threads", sm.wildcards.threads, "--engine-args", sm.params.engine_args]
        cmd += ["--data-npz", sm.input.npz, "--json", out, "--platform-name", ssh["name"]]
    print("$", shlex.join(cmd), file=log, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write(proc.stdout)
    log.flush()
    if proc.returncode != 0:
        raise Failed(last_error_line(proc.stdout))
    if mode == "setup":
        write_json_atomic(out, {"status": "ok", "reason": "", "platform": platform,
                         "output": proc.stdout.strip().splitlines()[-20:]})
    print(f"{what}: ok", file=log, flush=True)


try:
    run()
except Exception as err:  # noqa: BLE001 - whatever failed, the board's result is missing
    reason = str(err) if isinstance(err, Failed) else f"{type(err).__name__}: {err}"
    reason = " ".join(reason.split())
    print(f"{what} failed: {reason}", file=log, flush=True)
    if not last_attempt:
        say(f"dyvedeep: {what} failed (attempt {attempt}, retrying): {reason}")
        sys.exit(1)
    missing(reason)
