"""Build results/report.html: run `snakemake --report` on the report's content, with the
effective configuration of this run (targets before --configfile: it takes several values)."""
import subprocess
import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821
from _common import start_log  # noqa: E402

start_log(snakemake)  # noqa: F821
sm = snakemake  # noqa: F821
cmd = [
    sys.executable, "-m", "snakemake",
    "--snakefile", sm.params.snakefile,
    "--report", sm.output[0],
    sm.params.target,
    "--configfile", sm.input.config,
]
print("$", " ".join(cmd), flush=True)
proc = subprocess.run(cmd, stdout=sys.stdout, stderr=subprocess.STDOUT)
if proc.returncode != 0:
    sys.exit(f"snakemake --report failed (exit {proc.returncode}); see {sm.log[0]}")
