# When a run fails: one line per failed job (rule, wildcards, Slurm job id, the error its log
# ends with), after Snakemake's own report; see workflow/scripts/failures.py.
sys.path.insert(0, str(REPO / "workflow" / "scripts"))
from failures import report_failures


onerror:
    report_failures(log)
