"""Helpers shared by the workflow's scripts (imported through ``snakemake.scriptdir``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def start_log(snakemake: Any) -> None:
    """Send this script's stdout and stderr to the rule's log file (line-buffered)."""
    if snakemake.log:
        Path(snakemake.log[0]).parent.mkdir(parents=True, exist_ok=True)
        stream = open(snakemake.log[0], "w", buffering=1, encoding="utf-8")
        sys.stdout = stream
        sys.stderr = stream


def say(message: str) -> None:
    """One line to the log and to the console (Snakemake's own stderr)."""
    print(message, file=sys.stderr, flush=True)
    if sys.stderr is not sys.__stderr__:
        print(message, file=sys.__stderr__, flush=True)


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def last_error_line(text: str) -> str:
    """The one line that explains a failed command: its ``dyvedeep: error:`` line, else the
    last non-empty line of its output."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("dyvedeep: error:"):
            return ln[len("dyvedeep: error:"):].strip()
    return lines[-1] if lines else "failed without a message"


def platform_label(name: str, platforms: dict, emulated: bool | None = None) -> str:
    """How the report names a platform; an emulated board is "emulated aarch64"."""
    p = platforms.get(name, {})
    label = p.get("label") or name
    if emulated if emulated is not None else p.get("emulated"):
        label += " (emulated aarch64)"
    return label
