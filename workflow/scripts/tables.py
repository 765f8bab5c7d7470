"""Tables of the report from the JSON the commands wrote (docs/architecture.md):

- summary.csv: one row per benchmark, platform and thread setting (SUMMARY_COLUMNS); a
  missing benchmark or board keeps its rows, without numbers; DyVEDeep's speed-up over our
  dense path (``speedup``), over onnxruntime and over the papers' baseline (``speedup_vs_caffe``:
  Caffe-style im2col + sgemm on one thread; blank in a bench JSON written before it existed);
- layers.csv: benchmark, layer, knob, ops_dense, ops_dyvedeep (per image, host evaluation);
- missing.csv: benchmark, platform, threads, stage, reason of everything that is missing;
- paper_comparison.csv/.html: the paper's reported ranges beside ours;
- HTML versions of summary and layers;
- summary.fragment.html, paper_comparison.fragment.html: the same tables as HTML fragments that
  the report's front page includes.
"""

import html
import math
import sys

import pandas as pd
import yaml

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821
from _common import fragment, page, platform_label, read_json, start_log  # noqa: E402
from dyvedeep.io_utils import write_text_atomic  # noqa: E402

SUMMARY_COLUMNS = [
    "benchmark", "platform", "emulated", "threads", "n_test",
    "top1_dense", "top1_dyvedeep", "top1_loss_pt", "loss_ci_low", "loss_ci_high",
    "ops_dense", "ops_dyvedeep", "ops_reduction",
    "latency_dense_ms", "latency_dyvedeep_ms", "latency_onnxruntime_ms", "latency_caffe_ms",
    "speedup", "speedup_vs_onnxruntime", "speedup_vs_caffe",
]
EVAL_FIELDS = [
    "top1_dense", "top1_dyvedeep", "top1_loss_pt", "loss_ci_low", "loss_ci_high",
    "ops_dense", "ops_dyvedeep", "ops_reduction",
]
BENCH_FIELDS = [
    "latency_dense_ms", "latency_dyvedeep_ms", "latency_onnxruntime_ms", "latency_caffe_ms",
    "speedup", "speedup_vs_onnxruntime", "speedup_vs_caffe",
]
#: The papers' baseline as the tables and the report name it.
CAFFE_BASELINE = "Caffe-style baseline: im2col + sgemm, 1 thread"
#: Column headers of the summary's HTML table (the CSV keeps the column names).
SUMMARY_HEADERS = {
    "ops_dense": "ops_dense (per image)",
    "latency_caffe_ms": f"latency_caffe_ms ({CAFFE_BASELINE})",
    "speedup": "speedup (over our dense path)",
    "speedup_vs_onnxruntime": "speedup_vs_onnxruntime",
    "speedup_vs_caffe": f"speedup_vs_caffe (over the {CAFFE_BASELINE})",
}
SPEEDUP_COLUMNS = ("ops_reduction", "speedup", "speedup_vs_onnxruntime", "speedup_vs_caffe")
LAYER_COLUMNS = ["benchmark", "layer", "knob", "ops_dense", "ops_dyvedeep"]
MISSING_COLUMNS = ["benchmark", "platform", "threads", "stage", "reason"]


def is_missing(obj: dict) -> bool:
    return isinstance(obj, dict) and obj.get("status") == "missing"


def number(value):
    return None if value is None else float(value)


def build(plan: list[dict], platforms: dict):
    rows, layers, missing = [], [], []
    layers_done: set[str] = set()
    eval_missing_done: set[tuple[str, str]] = set()
    fetch_missing_done: set[str] = set()
    for entry in plan:
        bench, plat, threads = entry["benchmark"], entry["platform"], entry["threads"]
        row = {c: None for c in SUMMARY_COLUMNS}
        row.update(benchmark=bench, platform=plat, threads=threads,
                   emulated=bool(platforms.get(plat, {}).get("emulated", False)))
        if entry["status"] != "ok":
            if bench not in fetch_missing_done:
                fetch_missing_done.add(bench)
                missing.append({"benchmark": bench, "platform": "all", "threads": None,
                                "stage": "fetch", "reason": entry["reason"]})
            rows.append(row)
            continue
        ev = read_json(entry["eval"])
        if is_missing(ev):
            if (bench, plat) not in eval_missing_done:
                eval_missing_done.add((bench, plat))
                reason = ev.get("reason", "")
                stage = "board" if reason.startswith("board not available") else "eval"
                missing.append({"benchmark": bench, "platform": plat, "threads": None,
                                "stage": stage, "reason": reason})
        else:
            row["n_test"] = ev.get("n")
            for key in EVAL_FIELDS:
                row[key] = number(ev.get(key))
            if "emulated" in (ev.get("platform") or {}):
                row["emulated"] = bool(ev["platform"]["emulated"]) or row["emulated"]
            if bench not in layers_done and ev.get("layers"):
                layers_done.add(bench)
                for layer in ev["layers"]:
                    layers.append({"benchmark": bench, "layer": layer.get("layer"),
                                   "knob": layer.get("knob") or "none",
                                   "ops_dense": number(layer.get("ops_dense")),
                                   "ops_dyvedeep": number(layer.get("ops_dyvedeep"))})
        be = read_json(entry["bench"])
        if is_missing(be):
            if not is_missing(ev) or be.get("reason") != ev.get("reason"):
                missing.append({"benchmark": bench, "platform": plat, "threads": threads,
                                "stage": "bench", "reason": be.get("reason", "")})
        else:
            for key in BENCH_FIELDS:  # a key older bench JSONs lack stays blank
                row[key] = number(be.get(key))
            if "emulated" in (be.get("platform") or {}):
                row["emulated"] = bool(be["platform"]["emulated"]) or row["emulated"]
        rows.append(row)
    summary = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    summary["n_test"] = summary["n_test"].astype("Int64")
    summary["threads"] = summary["threads"].astype("Int64")
    missing = pd.DataFrame(missing, columns=MISSING_COLUMNS)
    missing["threads"] = missing["threads"].astype("Int64")
    return summary, pd.DataFrame(layers, columns=LAYER_COLUMNS), missing


# --- paper comparison ------------------------------------------------------------------------
def fmt_range(low, high, unit: str) -> str:
    def one(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "?"
        return f"{v:.2f}{unit}" if unit == "x" else f"{v:.2f}"
    if low is None and high is None:
        return "-"
    if low is None:
        return f"≤ {one(high)}" + (f" {unit}" if unit and unit != "x" else "")
    if high is None or low == high:
        return one(low) + (f" {unit}" if unit and unit != "x" else "")
    return f"{one(low)} – {one(high)}" + (f" {unit}" if unit and unit != "x" else "")


def compare(summary: pd.DataFrame, paper: dict, platforms: dict) -> pd.DataFrame:
    out = []
    n_total = summary["benchmark"].nunique()
    for m in paper["metrics"]:
        ours_spec = m.get("ours") or {}
        rec = {"metric": m["label"], "unit": m.get("unit", ""),
               "paper_low": m.get("low"), "paper_high": m.get("high"),
               "paper": m.get("text") or fmt_range(m.get("low"), m.get("high"), m.get("unit", "")),
               "ours_low": None, "ours_high": None, "ours": "-", "ours_benchmarks": 0, "note": ""}
        if ours_spec.get("count"):
            ok = summary.dropna(subset=["ops_reduction"])["benchmark"].nunique()
            rec.update(ours_low=ok, ours_high=ok, ours_benchmarks=ok,
                       ours=f"{ok} of {n_total} run here")
            out.append(rec)
            continue
        df = summary
        kind = ours_spec.get("platform_kind")
        if kind:
            names = [p for p, s in platforms.items() if s.get("kind") == kind]
            df = df[df["platform"].isin(names)]
            if kind == "ssh" and names and any(platforms[p].get("emulated") for p in names):
                rec["note"] = "emulated aarch64: op counts are real, times are not a Pi's"
            if not names:
                rec["note"] = "no such platform enabled in this run"
        if ours_spec.get("threads") is not None:
            df = df[df["threads"] == ours_spec["threads"]]
        per_bench = df.dropna(subset=[ours_spec["column"]]).groupby("benchmark")[ours_spec["column"]].first()
        if len(per_bench):
            lo, hi = float(per_bench.min()), float(per_bench.max())
            rec.update(ours_low=lo, ours_high=hi, ours_benchmarks=int(len(per_bench)),
                       ours=fmt_range(lo, hi, m.get("unit", "")))
        elif not rec["note"]:
            rec["note"] = "no result"
        out.append(rec)
    return pd.DataFrame(out)


# --- HTML ------------------------------------------------------------------------------------
def fmt_value(col: str, v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return "–"
    if col.startswith("ops_") and col != "ops_reduction":
        return f"{float(v) / 1e6:,.2f} M"
    if col in SPEEDUP_COLUMNS:
        return f"{float(v):.2f}x"
    if col.startswith("latency"):
        return f"{float(v):.3f}"
    if col.startswith("top1") or col.startswith("loss"):
        return f"{float(v):.2f}"
    if isinstance(v, (bool,)):
        return "yes" if v else "no"
    return html.escape(str(v))


def html_table(df: pd.DataFrame, cls: str = "dyve", missing_col: str | None = None,
               headers: dict | None = None) -> str:
    headers = headers or {}
    head = "".join(f"<th>{html.escape(headers.get(c, c))}</th>" for c in df.columns)
    body = []
    for _, r in df.iterrows():
        miss = missing_col is not None and (r[missing_col] is None or pd.isna(r[missing_col]))
        cells = "".join(f"<td>{fmt_value(c, r[c])}</td>" for c in df.columns)
        attr = ' class="missing"' if miss else ""
        body.append(f"<tr{attr}>{cells}</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def missing_list(missing: pd.DataFrame, platforms: dict) -> str:
    if missing.empty:
        return "<p class='note'>Nothing is missing.</p>"
    items = []
    for _, m in missing.iterrows():
        where = "" if m["platform"] == "all" else f" on {html.escape(platform_label(m['platform'], platforms))}"
        if m["threads"] is not None and not pd.isna(m["threads"]):
            where += f", {int(m['threads'])} thread(s)"
        items.append(f"<li><b>{html.escape(m['benchmark'])}</b> missing ({m['stage']}{where}): "
                     f"{html.escape(str(m['reason']))}</li>")
    return "<ul class='missing'>" + "".join(items) + "</ul>"


def summary_display(summary: pd.DataFrame, platforms: dict) -> pd.DataFrame:
    df = summary.copy()
    df["platform"] = [platform_label(p, platforms, bool(e)) for p, e in zip(df["platform"], df["emulated"])]
    return df.drop(columns=["emulated"])


def main(sm) -> None:
    start_log(sm)
    platforms = sm.params.platforms
    summary, layers, missing = build(sm.params.plan, platforms)
    summary.to_csv(sm.output.summary, index=False)
    layers.to_csv(sm.output.layers, index=False)
    missing.to_csv(sm.output.missing, index=False)
    print(summary.to_string())

    body = (html_table(summary_display(summary, platforms), missing_col="top1_dense", headers=SUMMARY_HEADERS)
            + "<p class='note'>Accuracies in %, losses in percentage points (95 % paired-bootstrap "
              "interval), ops per image (a multiply and an add count 2), latencies in ms per "
              "image (median, batch 1). Speed-ups of DyVEDeep over our dense path (what the "
              "dynamic effort alone buys), over onnxruntime, and over the papers' baseline "
              f"({CAFFE_BASELINE}, whatever the row's threads; blank where not timed). "
              "Times of an emulated board are not the board's.</p>"
            + "<h3>Missing</h3>" + missing_list(missing, platforms))
    write_text_atomic(sm.output.summary_html, page("DyVEDeep summary", body))
    write_text_atomic(sm.output.summary_fragment, fragment(body))
    write_text_atomic(sm.output.layers_html, page("Ops per layer and knob", html_table(layers)))

    with open(sm.input.paper, encoding="utf-8") as f:
        paper = yaml.safe_load(f)
    comparison = compare(summary, paper, platforms)
    comparison.to_csv(sm.output.paper_csv, index=False)
    shown = comparison[["metric", "paper", "ours", "ours_benchmarks", "note"]].rename(
        columns={"paper": "paper (reported)", "ours": "ours (this run)",
                 "ours_benchmarks": "benchmarks"})
    body = (html_table(shown)
            + f"<p class='note'>Paper: {html.escape(' '.join(paper['source'].split()))}; "
              f"benchmarks: {html.escape(', '.join(paper['benchmarks']))}; baseline: "
              f"{html.escape(paper.get('baseline', ''))}.</p>")
    write_text_atomic(sm.output.paper, page("The paper's results beside ours", body))
    write_text_atomic(sm.output.paper_fragment, fragment(body))


main(snakemake)  # noqa: F821
