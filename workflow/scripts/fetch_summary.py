"""Gather the fetch status of every benchmark into one file (the checkpoint that decides
which benchmarks go on)."""
import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821
from _common import read_json, start_log  # noqa: E402
from dyvedeep.io_utils import write_json_atomic  # noqa: E402

start_log(snakemake)  # noqa: F821
summary = {}
for bench, path in zip(snakemake.params.benchmarks, snakemake.input):  # noqa: F821
    st = read_json(path)
    summary[bench] = {"status": st["status"], "reason": st.get("reason", "")}
    print(f"{bench}: {st['status']} {st.get('reason', '')}".rstrip())
write_json_atomic(snakemake.output[0], summary)  # noqa: F821
