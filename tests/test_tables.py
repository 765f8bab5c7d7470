"""The workflow's tables script (workflow/scripts/tables.py) on result files written here: the
speed-ups over our dense path, over onnxruntime and over the Caffe-style baseline side by side;
a bench JSON written before the baseline existed gives blanks, not a crash. (The whole pipeline
runs in test_pipeline.py; this runs the script alone, in seconds.)"""
from __future__ import annotations

import csv
import json
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import PROJECT_ROOT

SCRIPTS = PROJECT_ROOT / "workflow" / "scripts"
EVAL = {"n": 10, "top1_dense": 80.0, "top1_dyvedeep": 79.0, "top1_loss_pt": 1.0, "loss_ci_low": 0.0,
        "loss_ci_high": 2.0, "ops_dense": 2.0e7, "ops_dyvedeep": 1.0e7, "ops_reduction": 2.0, "layers": [],
        "platform": {"machine": "x86_64", "emulated": False}}
OLD_BENCH = {"threads": 2, "latency_dense_ms": 1.0, "latency_dyvedeep_ms": 0.5, "latency_onnxruntime_ms": 0.8,
             "speedup": 2.0, "speedup_vs_onnxruntime": 1.6, "platform": {"machine": "x86_64", "emulated": False}}
NEW_BENCH = {**OLD_BENCH, "threads": 1, "latency_caffe_ms": 1.5, "speedup_vs_caffe": 3.0}


def run_tables(tmp_path: Path) -> Path:
    """tables.py on one benchmark: 1 thread from a current bench JSON, 2 from an old one."""
    def write(name: str, obj: dict) -> str:
        (tmp_path / name).write_text(json.dumps(obj), encoding="utf-8")
        return str(tmp_path / name)

    plan = [{"benchmark": "net", "platform": "x86", "threads": t, "status": "ok", "reason": "",
             "eval": write("eval.json", EVAL), "bench": write(f"t{t}.json", bench)}
            for t, bench in ((1, NEW_BENCH), (2, OLD_BENCH))]
    out = tmp_path / "tables"
    out.mkdir()
    files = {"summary": "summary.csv", "summary_html": "summary.html", "layers": "layers.csv",
             "layers_html": "layers.html", "missing": "missing.csv", "paper": "paper_comparison.html",
             "paper_csv": "paper_comparison.csv", "summary_fragment": "summary.fragment.html",
             "paper_fragment": "paper_comparison.fragment.html"}
    sm = SimpleNamespace(
        scriptdir=str(SCRIPTS), log=[],  # no log file: the output stays with pytest
        params=SimpleNamespace(plan=plan, platforms={"x86": {"kind": "local", "label": "x86 host", "emulated": False,
                                                             "threads": [1, 2]}}),
        input=SimpleNamespace(paper=str(PROJECT_ROOT / "reports" / "paper_results.yaml")),
        output=SimpleNamespace(**{k: str(out / v) for k, v in files.items()}))
    runpy.run_path(str(SCRIPTS / "tables.py"), init_globals={"snakemake": sm})
    return out


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_speedups_side_by_side_and_old_bench_json_blank(tmp_path):
    out = run_tables(tmp_path)
    columns, rows = read_csv(out / "summary.csv")
    assert columns[-7:] == ["latency_dense_ms", "latency_dyvedeep_ms", "latency_onnxruntime_ms", "latency_caffe_ms",
                            "speedup", "speedup_vs_onnxruntime", "speedup_vs_caffe"]
    new, old = rows
    assert (float(new["latency_caffe_ms"]), float(new["speedup_vs_caffe"])) == (1.5, 3.0)
    assert float(new["speedup"]) == 2.0 and float(new["speedup_vs_onnxruntime"]) == 1.6
    assert old["latency_caffe_ms"] == "" and old["speedup_vs_caffe"] == ""
    assert float(old["speedup"]) == 2.0  # the rest of the old row is read
    html = (out / "summary.html").read_text(encoding="utf-8")
    assert "over the Caffe-style baseline: im2col + sgemm, 1 thread" in html and "3.00x" in html
    _, paper = read_csv(out / "paper_comparison.csv")
    by_metric = {r["metric"]: r for r in paper}
    vs_caffe = next(r for m, r in by_metric.items() if "Xeon" in m and "Caffe-style baseline" in m)
    vs_dense = next(r for m, r in by_metric.items() if "Xeon" in m and "our dense path" in m)
    assert float(vs_caffe["ours_low"]) == pytest.approx(3.0)  # the 1-thread row's speedup_vs_caffe
    assert float(vs_dense["ours_low"]) == pytest.approx(2.0)
