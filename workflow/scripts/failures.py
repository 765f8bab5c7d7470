"""One line per failed job when a run fails (the workflow's `onerror`): its rule and output,
its Slurm job id when it ran through Slurm, and the error its log ends with, read from
Snakemake's log of the run (its "Error in rule ..." blocks)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

from _common import last_error_line

_BLOCK = re.compile(r"^Error in rule (?P<rule>\S+?):\n(?P<body>(?:[ \t]+.*\n?)*)", re.M)
_SLURM = re.compile(r"SLURM-job '(?P<id>[^']+)'|^\s*external_jobid: (?P<ext>\S+)", re.M)


def _field(body: str, name: str) -> str:
    match = re.search(rf"^\s*{name}: (.*)$", body, re.M)
    return match.group(1).strip() if match else ""


def failure_lines(log_text: str) -> list[str]:
    """The failed jobs of a run's log, one line each, in order. A job that ran through Slurm
    also shows, in its job log printed into the run's, the block of the Snakemake run on the
    node: one line per output, the one naming the Slurm job kept."""
    found: dict[str, tuple[str, str]] = {}  # output -> (Slurm job id, line)
    for block in _BLOCK.finditer(log_text):
        body = block.group("body")
        ids = [m.group("id") or m.group("ext") for m in _SLURM.finditer(body)]
        output = _field(body, "output")
        where = f" ({output})" if output else ""
        via = f" in Slurm job {ids[0]}" if ids else ""
        logs = [p.strip() for p in _field(body, "log").split(" (check")[0].split(",") if p.strip()]
        reason = "see the log"
        for path in logs[:1]:
            try:
                reason = last_error_line(Path(path).read_text(encoding="utf-8", errors="replace"))
            except OSError:
                pass
        line = f"dyvedeep: rule {block.group('rule')}{where} failed{via}: {reason}"
        if output not in found or (ids and not found[output][0]):
            found[output] = (ids[0] if ids else "", line)
    return [line for _, line in found.values()]


def report_failures(logs: str | list[str] | None) -> None:
    """Print the failure lines of the run whose Snakemake log(s) are ``logs`` (stderr)."""
    for path in [logs] if isinstance(logs, str) else (logs or []):
        if Path(path).is_file():
            for line in failure_lines(Path(path).read_text(encoding="utf-8", errors="replace")):
                print(line, file=sys.stderr, flush=True)
