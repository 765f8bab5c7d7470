"""The workflow's one line per failed job (workflow/scripts/failures.py, run by `onerror`):
read from Snakemake's log of a run, local or through Slurm (where the job's own log, printed
into the run's, repeats the block of the Snakemake run on the node)."""
from __future__ import annotations

import sys
from pathlib import Path

from tests.conftest import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "workflow" / "scripts"))
from failures import failure_lines  # noqa: E402


def test_a_slurm_failure_is_one_line_with_its_job_id(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "a.log").write_text("eval dense: 3/6 images\ndyvedeep: error: knobs.yaml: not valid YAML\n")
    run_log = """\
rule evaluate_shard:
Error in rule evaluate_shard:
    message: SLURM-job '12' failed, SLURM status is: 'FAILED'. Reason: Unknown.
    jobid: 9
    output: results/eval/q/images/0-6.json
    log: logs/a.log, .snakemake/slurm_logs/rule_evaluate_shard/q_0_6/12.log (check log file(s) for error details)
    external_jobid: 12
Logfile .snakemake/slurm_logs/rule_evaluate_shard/q_0_6/12.log:
Error in rule evaluate_shard:
    message: None
    jobid: 0
    output: results/eval/q/images/0-6.json
    log: logs/a.log (check log file(s) for error details)
Error in rule convert:
    jobid: 3
    output: results/models/q.onnx
    log: logs/missing.log (check log file(s) for error details)
"""
    assert failure_lines(run_log) == [
        "dyvedeep: rule evaluate_shard (results/eval/q/images/0-6.json) failed in Slurm job 12: "
        "knobs.yaml: not valid YAML",
        "dyvedeep: rule convert (results/models/q.onnx) failed: see the log",
    ]
