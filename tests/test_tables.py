"""The workflow's tables scripts on result files written here. tables.py: the speed-ups over our
dense path, over onnxruntime and over the Caffe-style baseline side by side; a bench JSON written
before the baseline existed gives blanks, not a crash. compare_tables.py: the rows of dense,
static, dynamic and gated settings, their op ratios, the pruned nets' losses paired image by image
with the dense net's, the gates' exit rates, and per-image results of other images refused.
executed_tables.py: counted and executed MACs per network and layer, an older evaluation blank.
(The whole pipeline runs in test_pipeline.py; this runs the scripts alone, in seconds.)"""
from __future__ import annotations

import csv
import json
import runpy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dyvedeep.errors import DyveError
from dyvedeep.evaluate import PER_IMAGE_FORMAT, paired_bootstrap
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


# --- the comparison table (workflow/scripts/compare_tables.py) ----------------------------------
LABELS = list(range(10))


def per_image(correct: list[bool], knob_correct: list[bool] | None = None, labels: list[int] = LABELS) -> dict:
    """Per-image results (`dyvedeep eval --per-image`) whose top-1 is right where ``correct`` says."""
    def tops(ok):
        return [[y if good else (y + 1) % 10, 9 - y] for y, good in zip(labels, ok)]
    dense = tops(correct)
    dyve = tops(knob_correct if knob_correct is not None else correct)
    return {"format": PER_IMAGE_FORMAT, "model": "m.onnx", "data": "cifar10:test", "knobs": None,
            "total": len(labels), "range": [0, len(labels)], "label": labels,
            "dense": {"argmax": [t[0] for t in dense], "top": dense},
            "dyvedeep": {"argmax": [t[0] for t in dyve], "top": dyve}, "counts": {}}


REF_OK = [True] * 8 + [False] * 2  # the dense net: 80 %
REF_EVAL = {**EVAL, "data": "cifar10:test", "top1_dense": 80.0, "top1_dyvedeep": 70.0, "top1_loss_pt": 10.0,
            "loss_ci_low": 0.0, "loss_ci_high": 20.0, "ops_dense": 2.0e7, "ops_dyvedeep": 1.0e7,
            "ops_reduction": 2.0, "nonzero_ops_dense": None}
# unstructured: the pruned net loses image 0, with its knobs also image 1; fan-in gains image 8
PRUNED = {"unstructured": ([False] + [True] * 7 + [False] * 2, [False, False] + [True] * 6 + [False] * 2),
          "fan-in": ([True] * 9 + [False], [True] * 9 + [False])}
PRUNED_EVAL = {"unstructured": {"n": 10, "data": "cifar10:test", "top1_dense": 70.0, "top1_dyvedeep": 60.0,
                                "ops_dense": 2.0e7, "ops_dyvedeep": 1.5e7, "nonzero_ops_dense": 1.6e7},
               "fan-in": {"n": 10, "data": "cifar10:test", "top1_dense": 90.0, "top1_dyvedeep": 90.0,
                          "ops_dense": 2.0e7, "ops_dyvedeep": 2.0e7, "nonzero_ops_dense": 1.8e7,
                          "nonzero_ops_dyvedeep": 1.7e7}}
GATES_EVAL = {**EVAL, "data": "cifar10:test", "top1_dyvedeep": 70.0, "top1_loss_pt": 10.0, "loss_ci_low": 0.0,
              "loss_ci_high": 30.0, "ops_dense": 2.0e7, "ops_dyvedeep": 1.6e7, "gate_ops": 1.0e4,
              "gates": [{"layer": "pool1", "threshold": 0.9, "confidence": "softmax", "exits": 2, "exit_rate": 20.0},
                        {"layer": "pool2", "threshold": 0.8, "confidence": "softmax", "exits": 1, "exit_rate": 10.0}]}
GATES_KNOBS_EVAL = {**GATES_EVAL, "ops_dyvedeep": 0.9e7, "gate_ops": 0.0, "gates": []}
COMPARE_FILES = {"csv": "comparison.csv", "exits": "comparison_exits.csv", "html": "comparison.html",
                 "fragment": "comparison.fragment.html"}


def run_compare(tmp_path: Path, plan: list[dict]) -> Path:
    out = tmp_path / "tables"
    out.mkdir(exist_ok=True)
    sm = SimpleNamespace(scriptdir=str(SCRIPTS), log=[],
                         params=SimpleNamespace(plan=plan, budgets={"knobs": 0.5, "gates": 0.5, "gates_knobs": 1.0,
                                                                    "prune": 0.5}),
                         output=SimpleNamespace(**{k: str(out / v) for k, v in COMPARE_FILES.items()}))
    runpy.run_path(str(SCRIPTS / "compare_tables.py"), init_globals={"snakemake": sm})
    return out


def compare_plan(tmp_path: Path, pruned_images: dict | None = None) -> list[dict]:
    def write(name: str, obj: dict) -> str:
        (tmp_path / name).write_text(json.dumps(obj), encoding="utf-8")
        return str(tmp_path / name)

    pruned_images = pruned_images or {m: per_image(*PRUNED[m]) for m in PRUNED}
    return [{"benchmark": "net", "eval": write("eval.json", REF_EVAL), "images": write("ref.json", per_image(REF_OK)),
             "gates": {"gates": write("gates.json", GATES_EVAL), "gates_knobs": write("gk.json", GATES_KNOBS_EVAL)},
             "pruned": {m: {"eval": write(f"{m}.json", PRUNED_EVAL[m]), "images": write(f"{m}.images.json", pruned_images[m])}
                        for m in PRUNED}}]


def test_comparison_rows_ratios_and_paired_losses(tmp_path):
    out = run_compare(tmp_path, compare_plan(tmp_path))
    columns, rows = read_csv(out / "comparison.csv")
    assert columns[:4] == ["benchmark", "setting", "label", "n_test"]
    by = {r["setting"]: r for r in rows}
    assert [r["setting"] for r in rows] == ["dense", "pruned_unstructured", "pruned_fan-in", "knobs", "gates",
                                            "gates_knobs", "pruned_unstructured_knobs", "pruned_fan-in_knobs"]
    assert float(by["dense"]["ops_reduction"]) == 1.0
    assert float(by["knobs"]["ops_reduction"]) == pytest.approx(2.0)
    assert float(by["knobs"]["top1_loss_pt"]) == 10.0 and float(by["knobs"]["loss_ci_high"]) == 20.0  # from eval as is
    # static: the dense net's ops over the pruned net's non-zero ops
    assert float(by["pruned_unstructured"]["ops"]) == 1.6e7
    assert float(by["pruned_unstructured"]["ops_reduction"]) == pytest.approx(2.0e7 / 1.6e7)
    assert by["pruned_unstructured"]["ops_counted"] == "non-zero MACs" and by["pruned_unstructured"]["ops_estimated"] == "False"
    # pruned + knobs, an evaluation without the engine's non-zero count with the knobs: non-zero ops x
    # the knobs' ratio on the pruned net (1.5e7 / 2e7), marked as an estimate
    assert float(by["pruned_unstructured_knobs"]["ops"]) == pytest.approx(1.6e7 * 0.75)
    assert float(by["pruned_unstructured_knobs"]["ops_reduction"]) == pytest.approx(2.0e7 / (1.6e7 * 0.75))
    assert by["pruned_unstructured_knobs"]["ops_estimated"] == "True"
    # an evaluation with the engine's non-zero count with the knobs: that count, not an estimate
    assert float(by["pruned_fan-in_knobs"]["ops"]) == 1.7e7
    assert by["pruned_fan-in_knobs"]["ops_counted"] == "non-zero MACs"
    assert by["pruned_fan-in_knobs"]["ops_estimated"] == "False"
    # losses of the pruned nets: paired with the dense net's per-image results, image by image
    ref = np.array(REF_OK)
    for setting, ok, loss in (("pruned_unstructured", PRUNED["unstructured"][0], 10.0),
                              ("pruned_unstructured_knobs", PRUNED["unstructured"][1], 20.0),
                              ("pruned_fan-in", PRUNED["fan-in"][0], -10.0)):
        low, high = paired_bootstrap(ref, np.array(ok))
        r = by[setting]
        assert float(r["top1_loss_pt"]) == pytest.approx(loss)
        assert (float(r["loss_ci_low"]), float(r["loss_ci_high"])) == pytest.approx((low, high))
        assert float(r["loss_ci_low"]) <= loss <= float(r["loss_ci_high"])
    assert float(by["pruned_unstructured"]["top1"]) == 70.0
    # gates: the gated eval's own ratio (the gates' ops included) and each gate's exit rate
    assert float(by["gates"]["ops_reduction"]) == pytest.approx(2.0e7 / 1.6e7)
    assert by["gates"]["exit_rates"] == "pool1 20.0 %, pool2 10.0 %"
    assert by["gates_knobs"]["exit_rates"] == "no gate kept"
    assert by["knobs"]["exit_rates"] == "" and by["dense"]["gate_ops"] == ""
    _, exits = read_csv(out / "comparison_exits.csv")
    assert [(e["setting"], e["layer"], float(e["exit_rate"])) for e in exits] == [("gates", "pool1", 20.0),
                                                                              ("gates", "pool2", 10.0)]
    fragment = (out / "comparison.fragment.html").read_text(encoding="utf-8")
    assert "<table" in fragment and "+10.00 [" in fragment and "pool1 20.0 %" in fragment
    assert "estimate" in fragment


def test_comparison_refuses_per_image_results_of_other_images(tmp_path):
    images = {m: per_image(*PRUNED[m]) for m in PRUNED}
    images["fan-in"] = per_image(*PRUNED["fan-in"], labels=[9 - y for y in LABELS])
    with pytest.raises(DyveError, match="fan-in.images.json: not the images of"):
        run_compare(tmp_path, compare_plan(tmp_path, images))
    assert not any((tmp_path / "tables").iterdir())  # nothing half-written


def test_comparison_without_families_says_so(tmp_path):
    out = run_compare(tmp_path, [])
    columns, rows = read_csv(out / "comparison.csv")
    assert rows == [] and "ops_reduction" in columns
    assert "No comparison family ran" in (out / "comparison.fragment.html").read_text(encoding="utf-8")


# --- executed and counted MACs (workflow/scripts/executed_tables.py) ------------------------------
EXEC_EVAL = {**EVAL, "macs_dense": 3000.0, "macs_dyvedeep": 1500.0, "executed_macs_dense": 3000.0,
             "executed_macs_dyvedeep": 2500.0,
             "layers": [{"layer": "conv1", "knob": "all", "ops_dense": 4100, "ops_dyvedeep": 4100, "macs_dense": 2000,
                         "macs_dyvedeep": 1000, "executed_macs_dyvedeep": 1600, "fallback_macs_dyvedeep": 400.0,
                         "executed_macs_dense": 2000},
                        {"layer": "conv1", "knob": "spet", "ops_dense": 4100, "ops_dyvedeep": 2000},
                        {"layer": "conv1", "knob": "sdss", "ops_dense": 4100, "ops_dyvedeep": 3000},
                        {"layer": "pool1", "knob": "all", "ops_dense": 100, "ops_dyvedeep": 100, "macs_dense": 0,
                         "macs_dyvedeep": 0, "executed_macs_dyvedeep": 0, "fallback_macs_dyvedeep": 0.0,
                         "executed_macs_dense": 0},
                        {"layer": "fc", "knob": "all", "ops_dense": 2010, "ops_dyvedeep": 2010, "macs_dense": 1000,
                         "macs_dyvedeep": 500, "executed_macs_dyvedeep": 900, "fallback_macs_dyvedeep": 0.0,
                         "executed_macs_dense": 1000}]}
EXEC_FILES = {"csv": "executed_macs.csv", "html": "executed_macs.html", "fragment": "executed_macs.fragment.html"}


def run_executed(tmp_path: Path, evaluations: dict[str, dict]) -> Path:
    out = tmp_path / "tables"
    out.mkdir(exist_ok=True)
    paths = []
    for bench, obj in evaluations.items():
        paths.append(tmp_path / f"{bench}.json")
        paths[-1].write_text(json.dumps(obj), encoding="utf-8")
    sm = SimpleNamespace(scriptdir=str(SCRIPTS), log=[], params=SimpleNamespace(benchmarks=list(evaluations)),
                         input=SimpleNamespace(evals=[str(p) for p in paths]),
                         output=SimpleNamespace(**{k: str(out / v) for k, v in EXEC_FILES.items()}))
    runpy.run_path(str(SCRIPTS / "executed_tables.py"), init_globals={"snakemake": sm})
    return out


def test_executed_macs_per_network_and_layer_and_an_old_eval_blank(tmp_path):
    out = run_executed(tmp_path, {"net": EXEC_EVAL, "old": EVAL})
    _, rows = read_csv(out / "executed_macs.csv")
    assert [(r["benchmark"], r["scope"], r["layer"], r["knobs"]) for r in rows] == [
        ("net", "network", "", ""), ("net", "layer", "conv1", "spet+sdss"), ("net", "layer", "fc", ""),
        ("old", "network", "", "")]
    net, conv1, fc, old = rows
    assert float(net["executed_per_counted"]) == pytest.approx(2500 / 1500)
    assert float(net["executed_per_dense"]) == pytest.approx(2500 / 3000)
    assert float(net["macs_fallback"]) == 400.0 and float(net["macs_executed_dense"]) == 3000.0
    assert (float(conv1["macs_counted"]), float(conv1["macs_executed"])) == (1000.0, 1600.0)
    assert float(conv1["executed_per_counted"]) == pytest.approx(1.6) and float(conv1["macs_fallback"]) == 400.0
    assert float(fc["executed_per_dense"]) == pytest.approx(0.9)
    assert old["macs_executed"] == "" and old["executed_per_counted"] == ""  # written before the count
    page = (out / "executed_macs.html").read_text(encoding="utf-8")
    assert "Layers with knobs" in page and "Layers without knobs" in page and "1.600x" in page
    fragment = (out / "executed_macs.fragment.html").read_text(encoding="utf-8")
    assert "<table" in fragment and "spet+sdss" in fragment and "Layers without knobs" not in fragment
