"""Helpers shared by the workflow's scripts (imported through ``snakemake.scriptdir``)."""
from __future__ import annotations

import html
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


# --- HTML tables of the report ---------------------------------------------------------------
# The tables' rules, shared by the pages and the fragments that the report's front page includes.
TABLE_STYLE = """
<style>
 table.dyve { border-collapse: collapse; font-size: 0.85em; }
 table.dyve th, table.dyve td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }
 table.dyve th { background: #f0f0f0; }
 table.dyve td:first-child, table.dyve td:nth-child(2) { text-align: left; }
 table.dyve tr.missing td { color: #999; font-style: italic; }
 p.note { font-size: 0.85em; color: #555; }
</style>
"""

PAGE_STYLE = "<style>body { font-family: system-ui, sans-serif; margin: 1em; }</style>"


def page(title: str, body: str) -> str:
    """A stand-alone HTML page of one table."""
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"{PAGE_STYLE}{TABLE_STYLE}</head><body><h2>{html.escape(title)}</h2>{body}</body></html>\n")


def fragment(body: str) -> str:
    """One table as an HTML fragment (its style rules scoped to the tables) that the report's
    front page includes as it is."""
    return f"{TABLE_STYLE.strip()}\n{body}\n"
