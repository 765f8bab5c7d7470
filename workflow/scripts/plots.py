"""Plots of the report (seaborn), from the tables and the calibration traces:

- op_reduction.png: the share of the dense ops each knob removes, per benchmark (stacked), with
  the overall reduction written beside each bar;
- layer_ops.png: ops per image of each layer, dense and DyVEDeep, one panel per benchmark;
- tradeoff.png: calibration accuracy loss against the ops left, every candidate tried and the
  accepted path, with the budget;
- latency.png: latency per image of each engine (dense, DyVEDeep, onnxruntime, the Caffe-style
  baseline), per benchmark, platform and thread setting;
- paper_vs_ours.png: the paper's reported ranges (bars) beside our benchmarks (points).
A plot without data says so instead of failing (e.g. when every benchmark is missing).
"""

import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821
from _common import platform_label, start_log  # noqa: E402

DPI = 110
sns.set_theme(style="whitegrid", context="notebook")


def empty(path: str, title: str, why: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, why, ha="center", va="center", wrap=True, color="#666")
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def save(fig, path: str) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def op_reduction(layers: pd.DataFrame, summary: pd.DataFrame, path: str) -> None:
    title = "Ops removed per benchmark, by knob"
    if layers.empty:
        return empty(path, title, "no per-layer results (every benchmark missing)")
    # Rows of knob "all" are the layers' totals; the other rows give, per knob, the layer's ops
    # with that knob's savings and overheads alone (docs/architecture.md, `dyvedeep eval`).
    df = layers.copy()
    df["saved"] = df["ops_dense"] - df["ops_dyvedeep"]
    totals = df[df["knob"] == "all"]
    dense = totals.groupby("benchmark", sort=False)["ops_dense"].sum()
    combined = 100 * totals.groupby("benchmark", sort=False)["saved"].sum() / dense
    by_knob = df[~df["knob"].isin(["all", "none"])].groupby(["benchmark", "knob"], as_index=False)["saved"].sum()
    by_knob["share"] = 100 * by_knob["saved"] / by_knob["benchmark"].map(dense)
    order = list(dense.index)
    fig, ax = plt.subplots(figsize=(8, 0.7 * len(order) + 1.8))
    if by_knob.empty or not (by_knob["share"].abs() > 0).any():
        ax.text(0.5, 0.5, "no knob removed any op", ha="center", transform=ax.transAxes)
    else:
        by_knob["benchmark"] = pd.Categorical(by_knob["benchmark"], categories=order)
        sns.histplot(data=by_knob, y="benchmark", weights="share", hue="knob", multiple="stack",
                     discrete=True, shrink=0.7, ax=ax, palette="deep")
        sns.move_legend(ax, "center left", bbox_to_anchor=(1.02, 0.5), title="knob")
    ax.set_xlabel("share of the dense ops removed (%)")
    ax.set_ylabel("")
    ax.set_xlim(0, 100)
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels(order)
    ax.set_ylim(len(order) - 0.5, -0.5)
    reduction = summary.dropna(subset=["ops_reduction"]).groupby("benchmark")["ops_reduction"].first()
    total = by_knob.groupby("benchmark", observed=False)["share"].sum() if not by_knob.empty else {}
    for i, name in enumerate(order):
        if name in combined:
            ax.plot([combined[name]] * 2, [i - 0.4, i + 0.4], color="black", lw=2,
                    label="all knobs together" if i == 0 else None)
        if name in reduction:
            x = max(float(total.get(name, 0)), float(combined.get(name, 0))) + 1
            ax.text(x, i, f"{reduction[name]:.2f}x fewer ops", va="center", ha="left", fontsize=9)
    if ax.get_legend() is not None:
        handles, labels = ax.get_legend_handles_labels()
        old = ax.get_legend()
        knob_handles = old.legend_handles
        knob_labels = [t.get_text() for t in old.get_texts()]
        ax.legend(knob_handles + handles, knob_labels + labels, loc="center left",
                  bbox_to_anchor=(1.02, 0.5), title="knob (alone)")
    ax.set_title(title)
    save(fig, path)


def layer_ops(layers: pd.DataFrame, path: str) -> None:
    title = "Ops per image of each layer"
    if layers.empty:
        return empty(path, title, "no per-layer results (every benchmark missing)")
    df = layers[layers["knob"] == "all"]
    if df.empty:
        return empty(path, title, "no per-layer totals")
    long = df.melt(id_vars=["benchmark", "layer"], value_vars=["ops_dense", "ops_dyvedeep"],
                   var_name="engine", value_name="ops")
    long["engine"] = long["engine"].map({"ops_dense": "dense", "ops_dyvedeep": "DyVEDeep"})
    long["Mops"] = long["ops"] / 1e6
    n = long["benchmark"].nunique()
    g = sns.catplot(data=long, kind="bar", x="layer", y="Mops", hue="engine", col="benchmark",
                    col_wrap=min(2, n), sharex=False, sharey=False, height=3.6, aspect=1.8,
                    palette=["#999999", "#c44e52"])
    for ax in g.axes.flat:
        ax.tick_params(axis="x", rotation=90, labelsize=7)
        ax.set_xlabel("")
    g.set_titles("{col_name}")
    g.set_axis_labels("", "M ops per image")
    g.tight_layout()
    g.figure.suptitle(title, y=1.02)
    save(g.figure, path)


def tradeoff(traces: list[str], benchmarks: list[str], summary: pd.DataFrame, budget: float,
             path: str) -> None:
    title = "Calibration: accuracy loss against ops"
    frames = []
    dense = summary.dropna(subset=["ops_dense"]).groupby("benchmark")["ops_dense"].first()
    for bench, trace in zip(benchmarks, traces):
        try:
            t = pd.read_csv(trace)
        except pd.errors.EmptyDataError:
            continue
        if t.empty or "ops" not in t or "calib_loss_pt" not in t:
            continue
        t["benchmark"] = bench
        ref = dense.get(bench, float("nan"))
        if not ref or math.isnan(ref):
            ref = t["ops"].max()
        t["ops_left"] = 100 * t["ops"] / ref
        frames.append(t)
    if not frames:
        return empty(path, title, "no calibration trace")
    df = pd.concat(frames, ignore_index=True)
    df["accepted"] = df["accepted"].astype(str).str.lower().isin(["true", "1", "yes"])
    names = list(dict.fromkeys(df["benchmark"]))
    palette = dict(zip(names, sns.color_palette("deep", len(names))))
    fig, ax = plt.subplots(figsize=(8, 5))
    sns.scatterplot(data=df[~df["accepted"]], x="ops_left", y="calib_loss_pt", hue="benchmark",
                    hue_order=names, palette=palette, alpha=0.6, s=30, ax=ax, legend=False,
                    marker="X")
    acc = df[df["accepted"]].sort_values(["benchmark", "step"])
    if not acc.empty:
        sns.lineplot(data=acc, x="ops_left", y="calib_loss_pt", hue="benchmark", hue_order=names,
                     palette=palette, marker="o", sort=False, estimator=None, ax=ax)
    ax.axhline(budget, ls="--", color="#555")
    ax.text(ax.get_xlim()[0], budget, f" budget {budget} pt", va="bottom", fontsize=9, color="#555")
    ax.set_xlabel("ops left (% of dense)")
    ax.set_ylabel("calibration top-1 loss (pt)")
    ax.invert_xaxis()
    ax.set_title(title + " (x: candidates, line: accepted steps)")
    save(fig, path)


def latency(summary: pd.DataFrame, platforms: dict, path: str) -> None:
    title = "Latency per image (median, batch 1)"
    cols = {"latency_dense_ms": "dense", "latency_dyvedeep_ms": "DyVEDeep",
            "latency_onnxruntime_ms": "onnxruntime",
            "latency_caffe_ms": "Caffe-style baseline (im2col + sgemm, 1 thread)"}
    colours = dict(zip(cols.values(), ["#999999", "#c44e52", "#4c72b0", "#55a868"]))
    df = summary.dropna(subset=["latency_dense_ms", "latency_dyvedeep_ms"], how="all")
    if df.empty:
        return empty(path, title, "no timing results")
    df = df.copy()
    df["setting"] = [f"{platform_label(p, platforms, bool(e))}, {int(t)} thread{'s' if int(t) > 1 else ''}"
                     for p, e, t in zip(df["platform"], df["emulated"], df["threads"])]
    long = df.melt(id_vars=["benchmark", "setting"], value_vars=[c for c in cols if c in df], var_name="engine",
                   value_name="ms").dropna(subset=["ms"])
    long["engine"] = long["engine"].map(cols)
    n = long["benchmark"].nunique()
    g = sns.catplot(data=long, kind="bar", x="setting", y="ms", hue="engine", col="benchmark",
                    col_wrap=min(2, n), sharex=False, sharey=False, height=3.4, aspect=1.5,
                    hue_order=[c for c in cols.values() if c in set(long["engine"])],
                    palette=colours)
    g.set_titles("{col_name}")
    g.set_axis_labels("", "ms per image")
    for ax in g.axes.flat:
        ax.tick_params(axis="x", rotation=15, labelsize=8)
    g.tight_layout()
    g.figure.suptitle(title, y=1.02)
    save(g.figure, path)


def paper_vs_ours(summary: pd.DataFrame, paper: dict, platforms: dict, path: str) -> None:
    title = "The paper's reported ranges (bars) and our benchmarks (points)"
    metrics = [m for m in paper["metrics"] if m.get("unit") == "x"]
    points = []
    for i, m in enumerate(metrics):
        spec = m["ours"]
        df = summary
        if spec.get("platform_kind"):
            names = [p for p, s in platforms.items() if s.get("kind") == spec["platform_kind"]]
            df = df[df["platform"].isin(names)]
        if spec.get("threads") is not None:
            df = df[df["threads"] == spec["threads"]]
        per = df.dropna(subset=[spec["column"]]).groupby("benchmark", as_index=False).first()
        for _, r in per.iterrows():
            label = m["label"]
            points.append({"metric": label, "value": r[spec["column"]], "benchmark": r["benchmark"],
                           "platform": platform_label(r["platform"], platforms, bool(r["emulated"]))})
    labels = [m["label"] for m in metrics]
    fig, ax = plt.subplots(figsize=(9, 1.1 * len(labels) + 1.5))
    for i, m in enumerate(metrics):
        ax.barh(i, m["high"] - m["low"], left=m["low"], height=0.5, color="#dddddd",
                edgecolor="#888888", label="paper (reported range)" if i == 0 else None)
        ax.text(m["high"], i, f"  paper {m['low']:.2f}–{m['high']:.2f}x", va="center", fontsize=8,
                color="#555")
    if points:
        df = pd.DataFrame(points)
        df["y"] = df["metric"].map({lab: i for i, lab in enumerate(labels)})
        sns.scatterplot(data=df, x="value", y="y", hue="benchmark", style="benchmark", s=70, ax=ax,
                        zorder=3)
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    else:
        ax.text(0.5, -0.6, "no results of ours (every benchmark missing)", ha="center",
                transform=ax.get_yaxis_transform(), color="#666")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlim(left=0)
    ax.axvline(1.0, color="#999", lw=0.8, ls=":")
    ax.set_xlabel("times (x)")
    ax.set_ylabel("")
    ax.set_title(title)
    save(fig, path)


def main(sm) -> None:
    start_log(sm)
    summary = pd.read_csv(sm.input.summary)
    layers = pd.read_csv(sm.input.layers)
    with open(sm.input.paper, encoding="utf-8") as f:
        paper = yaml.safe_load(f)
    platforms = sm.params.platforms
    op_reduction(layers, summary, sm.output.op_reduction)
    layer_ops(layers, sm.output.layer_ops)
    tradeoff(list(sm.input.traces), list(sm.params.benchmarks), summary, sm.config["budget"],
             sm.output.tradeoff)
    latency(summary, platforms, sm.output.latency)
    paper_vs_ours(summary, paper, platforms, sm.output.paper)


main(snakemake)  # noqa: F821
