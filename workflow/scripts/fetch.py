"""Fetch the model files of one benchmark with ``dyvedeep fetch URL --checksum C -o DEST
--mirror DIR`` (mirror first, then the URL; checksums verified). Writes the status file
{status: ok|missing, reason, files}; a benchmark whose files (or data) cannot be had is
"missing" with the one-line reason, printed on the console too. A file that cannot be had
never fails the job; a crash of the command itself does."""
import os
import shlex
import subprocess
import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821
from _common import last_error_line, read_json, say, start_log  # noqa: E402
from dyvedeep.io_utils import write_json_atomic  # noqa: E402

start_log(snakemake)  # noqa: F821
sm = snakemake  # noqa: F821
bench = sm.wildcards.bench
os.makedirs(sm.output.files, exist_ok=True)

# The model files are fetched even when the data is missing, so that one run tells all.
reasons = []
for data_status in sm.input.data:
    data = read_json(data_status)
    if data["status"] != "ok":
        reasons.append(data["reason"])

files = []
for f in sm.params.files:
    cmd = shlex.split(sm.params.dyvedeep) + ["fetch", f["url"], "-o", f["path"], "--quiet"]
    if f["checksum"]:
        cmd += ["--checksum", f["checksum"]]
    if sm.params.mirror:
        cmd += ["--mirror", sm.params.mirror]
    print("$", shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0 and "dyvedeep: error:" not in proc.stdout:
        # not a file that cannot be had but a failure of the command itself: a real error
        sys.exit(f"dyvedeep fetch failed (exit {proc.returncode}) for {f['url']}; see {sm.log[0]}")
    if proc.returncode != 0:
        reasons.append(f"{f['role']} file: {last_error_line(proc.stdout)}")
        continue
    files.append({"role": f["role"], "url": f["url"], "path": f["path"]})

# Formats whose weights can be downloaded but not converted here.
UNCONVERTIBLE = {
    "overfeat": "OverFeat's own weight format has no converter in dyvedeep convert; turn the weights "
                "into a caffemodel (with the overfeat_fast prototxt of tests/factories/prototxts.py) and use format caffe",
}
if sm.params.format in UNCONVERTIBLE:
    reasons.append(UNCONVERTIBLE[sm.params.format])

status = {"benchmark": bench, "status": "missing" if reasons else "ok",
          "reason": "; ".join(reasons), "files": files}
if reasons:
    say(f"dyvedeep: benchmark {bench} missing: {status['reason']}")
else:
    print(f"benchmark {bench}: {len(files)} files ok")
write_json_atomic(sm.output.status, status)
