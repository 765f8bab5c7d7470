"""The Pi profile end to end on the emulated board: the real `snakemake` runs the workflow on a
reduced configuration (cifar10_quick from the mirror) with the x86 host and the emulated board;
the engine runs on the board, its rows come back into the same tables, they agree with x86 up
to float rounding (top-1 within 0.2 pt, mean ops within 0.1 %), and the report names the board
"emulated aarch64", never a Raspberry Pi time. Runs before test_pi_remote.py, whose last test
stops the board."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dyvedeep import remote
from tests.test_pipeline import make_workdir, read_csv, real_mirror, snakemake  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.mirror]


@pytest.fixture(scope="module")
def pi_pipeline(real_mirror: Path, emulator_paths: Any, pi_board: remote.Board,
                pi_engine: remote.SetupResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reduced pipeline with the Pi profile's board, run once; its working directory."""
    workdir = make_workdir(tmp_path_factory.mktemp("pi_pipeline"), real_mirror)
    overlay = json.loads((workdir / "ci.yaml").read_text(encoding="utf-8"))
    overlay["platforms"] = {"pi": {"kind": "ssh", "label": "Raspberry Pi", "emulated": True, "threads": [1],
                                   "board": str(emulator_paths.cache / "board.json")}}
    overlay["platforms_enabled"] = ["x86", "pi"]
    (workdir / "ci.yaml").write_text(json.dumps(overlay, indent=2), encoding="utf-8")
    proc = snakemake(workdir, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return workdir


def test_board_rows_come_back_and_agree_with_x86(pi_pipeline: Path) -> None:
    _, rows = read_csv(pi_pipeline / "results" / "tables" / "summary.csv")
    board = [r for r in rows if r["platform"] == "pi"]
    host = [r for r in rows if r["platform"] == "x86" and r["threads"] == "1"]
    assert len(board) == 1 and len(host) == 1, rows
    b, h = board[0], host[0]
    assert b["emulated"] == "True" and h["emulated"] == "False"
    assert b["n_test"] == h["n_test"] and int(b["n_test"]) > 0
    for key in ("top1_dense", "top1_dyvedeep"):
        assert abs(float(b[key]) - float(h[key])) <= 0.2, (key, b[key], h[key])
    for key in ("ops_dense", "ops_dyvedeep"):
        assert abs(float(b[key]) - float(h[key])) <= 1e-3 * float(h[key]), (key, b[key], h[key])
    assert float(b["latency_dense_ms"]) > 0 and float(b["latency_dyvedeep_ms"]) > 0
    _, missing = read_csv(pi_pipeline / "results" / "tables" / "missing.csv")
    assert not [m for m in missing if m["platform"] == "pi"], missing


def test_report_labels_the_board_emulated(pi_pipeline: Path) -> None:
    html = (pi_pipeline / "results" / "tables" / "summary.html").read_text(encoding="utf-8")
    assert "emulated aarch64" in html
    report = (pi_pipeline / "results" / "report.html").read_text(encoding="utf-8", errors="replace")
    assert "emulated aarch64" in report
