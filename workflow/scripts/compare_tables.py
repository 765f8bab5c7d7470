"""The comparison table of the report (issue 17; the families are beyond the specification): per
benchmark that `compare` turns a family on for, one row per setting on the test split -

  dense; static (a) unstructured and (b) equal fan-in pruning; dynamic (the three knobs);
  decision gates; gates + knobs; each pruned net + the knobs calibrated on it

- with its top-1, its top-1 loss against the dense (unpruned) net with the 95 % paired-bootstrap
interval, its ops per image, the op reduction dense / ops, how the ops are counted, and for gates
the gates' own ops and each gate's exit rate.

Ops: dense, knobs and gates are the engine's counts (`dyvedeep eval`: ``ops_dense``,
``ops_dyvedeep``; the gates' own ops included); a pruned net's are its non-zero ops
(``nonzero_ops_dense``, as for the Deep Compression nets, docs/pruning.md), against the dense
net's (its own non-zero count where its metadata has one). A pruned net with the knobs: the
engine's count of its ops on non-zero weights (``nonzero_ops_dyvedeep``); an evaluation written
before that count existed gives an estimate, the pruned net's non-zero ops times the knobs' ratio
on that net (ops_dyvedeep / ops_dense), and says so. A pruned net's losses pair its per-image
results with those of the dense net.

Outputs: comparison.csv (COLUMNS), comparison_exits.csv (EXIT_COLUMNS: one row per gate),
comparison.html and comparison.fragment.html (the report's front page includes the fragment).
"""

import html
import math
import sys

import numpy as np
import pandas as pd

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821
from _common import fragment, page, read_json, start_log  # noqa: E402
from dyvedeep.errors import DyveError  # noqa: E402
from dyvedeep.evaluate import paired_bootstrap, read_per_image  # noqa: E402
from dyvedeep.io_utils import write_text_atomic  # noqa: E402

COLUMNS = ["benchmark", "setting", "label", "n_test", "top1", "top1_loss_pt", "loss_ci_low", "loss_ci_high",
           "ops", "ops_reduction", "ops_counted", "ops_estimated", "gate_ops", "exit_rates"]
EXIT_COLUMNS = ["benchmark", "setting", "layer", "confidence", "threshold", "exits", "exit_rate"]
METHOD_LABELS = {"unstructured": "(a) unstructured", "fan-in": "(b) equal fan-in"}
GATE_LABELS = {"gates": "decision gates", "gates_knobs": "decision gates + knobs"}
#: How a row's ops are counted (the ``ops_counted`` column).
ENGINE_COUNT = "engine count"
NONZERO_COUNT = "non-zero MACs"
ESTIMATE = "estimate: non-zero ops x the knobs' ratio"


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def row(bench: str, setting: str, label: str, n: int, top1: float, loss, low, high, ops: float,
        dense_ops: float, counted: str, gate_ops=None, exit_rates: str = "") -> dict:
    return {"benchmark": bench, "setting": setting, "label": label, "n_test": n, "top1": top1,
            "top1_loss_pt": loss, "loss_ci_low": low, "loss_ci_high": high, "ops": ops,
            "ops_reduction": dense_ops / ops if ops else math.inf, "ops_counted": counted,
            "ops_estimated": counted == ESTIMATE,
            "gate_ops": gate_ops, "exit_rates": exit_rates}


def top1_correct(images: dict, engine: str) -> np.ndarray:
    """Per image: whether ``engine``'s (dense / dyvedeep) top-1 class is the label."""
    top = np.asarray(images[engine]["top"], dtype=np.int64)
    return top.reshape(len(top), -1)[:, 0] == np.asarray(images["label"], dtype=np.int64)


def paired_loss(reference: np.ndarray, other: np.ndarray) -> tuple[float, float, float]:
    """Top-1 loss in pt of ``other`` against ``reference`` (per-image correctness, the same
    images) and its 95 % paired-bootstrap interval (`dyvedeep eval`'s)."""
    low, high = paired_bootstrap(reference, other)
    return float((reference.mean() - other.mean()) * 100), low, high


def exit_text(gates: list[dict]) -> str:
    if not gates:
        return "no gate kept"
    return ", ".join(f"{g['layer']} {g['exit_rate']:.1f} %" for g in gates)


def same_images(reference: dict, other: dict, ref_name: str, other_name: str) -> None:
    """A pruned net's per-image results pair with the dense net's only on the same images."""
    if (reference["data"], reference["range"], reference["label"]) != (other["data"], other["range"], other["label"]):
        raise DyveError(f"{other_name}: not the images of {ref_name} ({other['data']} {other['range']} "
                        f"vs {reference['data']} {reference['range']})")


def benchmark_rows(entry: dict) -> tuple[list[dict], list[dict]]:
    """The comparison rows and the gates' exit rows of one compare_plan() entry."""
    bench = entry["benchmark"]
    ref = read_json(entry["eval"])
    n = int(ref["n"])
    dense_ops = float(ref["ops_dense"])
    # a pruned net's non-zero ops are set against the dense net's own non-zero count, if it has one
    dense_nonzero = float(ref["nonzero_ops_dense"]) if ref.get("nonzero_ops_dense") is not None else dense_ops
    rows = [row(bench, "dense", "dense", n, ref["top1_dense"], 0.0, 0.0, 0.0, dense_ops, dense_ops, ENGINE_COUNT)]
    exits = []
    ref_images = read_per_image(entry["images"]) if entry.get("pruned") else None
    ref_ok = top1_correct(ref_images, "dense") if ref_images is not None else None
    pruned = {}
    for method, files in entry.get("pruned", {}).items():
        ev, images = read_json(files["eval"]), read_per_image(files["images"])
        same_images(ref_images, images, entry["images"], files["images"])
        if ev.get("nonzero_ops_dense") is None:
            raise DyveError(f"{files['eval']}: no nonzero_ops_dense (not a model of `dyvedeep prune`)")
        nonzero = float(ev["nonzero_ops_dense"])
        static_ok, knobs_ok = top1_correct(images, "dense"), top1_correct(images, "dyvedeep")
        rows.append(row(bench, f"pruned_{method}", f"static {method_label(method)}", n, ev["top1_dense"],
                        *paired_loss(ref_ok, static_ok), nonzero, dense_nonzero, NONZERO_COUNT))
        if ev.get("nonzero_ops_dyvedeep") is not None:
            knobs_nonzero, counted = float(ev["nonzero_ops_dyvedeep"]), NONZERO_COUNT
        else:
            knobs_nonzero, counted = nonzero * float(ev["ops_dyvedeep"]) / float(ev["ops_dense"]), ESTIMATE
        pruned[method] = row(bench, f"pruned_{method}_knobs", f"{method_label(method)} pruned + knobs", n,
                             ev["top1_dyvedeep"], *paired_loss(ref_ok, knobs_ok), knobs_nonzero,
                             dense_nonzero, counted)
    rows.append(row(bench, "knobs", "dynamic: the three knobs", n, ref["top1_dyvedeep"], ref["top1_loss_pt"],
                    ref["loss_ci_low"], ref["loss_ci_high"], ref["ops_dyvedeep"], dense_ops, ENGINE_COUNT))
    for setting, path in entry.get("gates", {}).items():
        ev = read_json(path)
        if int(ev["n"]) != n or ev["data"] != ref["data"]:
            raise DyveError(f"{path}: evaluated on {ev['n']} images of {ev['data']}, the knobs on {n} of {ref['data']}")
        rows.append(row(bench, setting, GATE_LABELS.get(setting, setting), n, ev["top1_dyvedeep"], ev["top1_loss_pt"],
                        ev["loss_ci_low"], ev["loss_ci_high"], ev["ops_dyvedeep"], float(ev["ops_dense"]),
                        ENGINE_COUNT, ev.get("gate_ops", 0.0), exit_text(ev.get("gates", []))))
        exits += [{"benchmark": bench, "setting": setting, **{k: g[k] for k in EXIT_COLUMNS[2:]}}
                  for g in ev.get("gates", [])]
    rows += list(pruned.values())
    return rows, exits


def build(plan: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, exits = [], []
    for entry in plan:
        r, e = benchmark_rows(entry)
        rows += r
        exits += e
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["n_test"] = table["n_test"].astype("Int64")
    return table, pd.DataFrame(exits, columns=EXIT_COLUMNS)


# --- HTML ------------------------------------------------------------------------------------
def cell(value, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if kind == "ops":
        return f"{float(value) / 1e6:,.3f} M"
    if kind == "ratio":
        return "all" if math.isinf(value) else f"{float(value):.3f}x"
    if kind == "pct":
        return f"{float(value):.2f}"
    return html.escape(str(value))


def loss_cell(r) -> str:
    if r["setting"] == "dense":
        return "(reference)"
    return f"{r['top1_loss_pt']:+.2f} [{r['loss_ci_low']:+.2f}, {r['loss_ci_high']:+.2f}]"


def benchmark_table(df: pd.DataFrame) -> str:
    head = ["setting", "top-1 (%)", "top-1 loss, pt [95 % CI]", "ops per image", "op reduction",
            "ops counted", "gates' own ops", "exit rate per gate"]
    body = []
    for _, r in df.iterrows():
        cells = [cell(r["label"], ""), cell(r["top1"], "pct"), html.escape(loss_cell(r)), cell(r["ops"], "ops"),
                 cell(r["ops_reduction"], "ratio"), cell(r["ops_counted"], ""),
                 cell(r["gate_ops"], "ops") if r["setting"] in GATE_LABELS else "",
                 cell(r["exit_rates"], "") if r["setting"] in GATE_LABELS else ""]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    thead = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f'<table class="dyve"><thead><tr>{thead}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def html_body(table: pd.DataFrame, budgets: dict) -> str:
    """The tables, one per benchmark, and what they show; ``budgets``: pt per family (knobs,
    gates, gates_knobs, prune)."""
    if table.empty:
        return ("<p class='note'>No comparison family ran: `compare.gates.benchmarks` and "
                "`compare.prune.benchmarks` list no benchmark of this run (config/config.yaml).</p>")
    parts = []
    for bench, df in table.groupby("benchmark", sort=False):
        n = df["n_test"].iloc[0]
        parts.append(f"<h4>{html.escape(str(bench))} ({n} test images)</h4>" + benchmark_table(df))
    parts.append(
        "<p class='note'>Beyond the specification: decision gates (docs/gates.md) and static magnitude "
        "pruning without retraining (docs/pruning.md) beside DyVEDeep's knobs, each calibrated on the "
        f"calibration split with the same label-free criterion: the knobs within {budgets['knobs']} pt, the "
        f"gates within {budgets['gates']} pt (on top of the knobs: knobs and gates together within "
        f"{budgets['gates_knobs']} pt), the pruning within "
        f"{budgets['prune']} pt and then the knobs within their own {budgets['knobs']} pt on the pruned net. "
        "Losses against "
        "the dense net on the test split, with the 95 % paired-bootstrap interval. Ops per image: the "
        f"engine's count ({ENGINE_COUNT}, overheads and the gates' own ops included), for a pruned net its "
        f"non-zero ops ({NONZERO_COUNT}), with the knobs too (for an evaluation older than that count, an "
        f"{html.escape(ESTIMATE)}). Exit rate: % of the test images that leave at the gate.</p>")
    return "".join(parts)


def main(sm) -> None:
    start_log(sm)
    table, exits = build(sm.params.plan)
    write_text_atomic(sm.output.csv, table.to_csv(index=False))
    write_text_atomic(sm.output.exits, exits.to_csv(index=False))
    print(table.to_string())
    body = html_body(table, sm.params.budgets)
    write_text_atomic(sm.output.html, page("Dense, static, dynamic and gated, side by side", body))
    write_text_atomic(sm.output.fragment, fragment(body))


main(snakemake)  # noqa: F821
