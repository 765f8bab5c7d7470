"""Plots of the headroom (seaborn), from results/tables/headroom.csv:

- headroom.png: per benchmark, the network's op reduction achieved by the calibrated knobs beside
  each oracle ceiling;
- headroom_layers.png: per benchmark (one panel each), the ops per image left in each conv / fc
  layer: dense, achieved, and the ceilings (log scale).
"""

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821
from _common import start_log  # noqa: E402

DPI = 110
sns.set_theme(style="whitegrid", context="notebook")


def empty(path: str, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, "no headroom results (every benchmark missing)", ha="center", va="center", color="#666")
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def network(df: pd.DataFrame, path: str) -> None:
    title = "Op reduction: achieved vs. oracle ceilings"
    net = df[df["scope"] == "network"].copy()
    if net.empty:
        return empty(path, title)
    # a network whose every op is saved cannot happen (pooling, softmax stay), but keep it drawable
    net["reduction"] = net["reduction"].replace(np.inf, np.nan)
    order = list(dict.fromkeys(net["label"]))
    benchmarks = list(dict.fromkeys(net["benchmark"]))
    fig, ax = plt.subplots(figsize=(max(7, 2.2 * len(benchmarks)), 4.5))
    sns.barplot(data=net, x="benchmark", y="reduction", hue="label", hue_order=order, ax=ax,
                palette=["#333333"] + sns.color_palette("tab10", len(order) - 1))
    for container in ax.containers:
        ax.bar_label(container, fmt="%.2f", fontsize=7, rotation=90, padding=2)
    ax.axhline(1.0, color="#999", lw=0.8)
    ax.set_ylabel("op reduction (dense / left)")
    ax.set_xlabel("")
    ax.set_title(title)
    ax.legend(title="", fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def layers(df: pd.DataFrame, path: str) -> None:
    title = "Ops per image left per layer: achieved vs. oracle ceilings"
    lay = df[df["scope"] == "layer"].copy()
    lay = lay[lay["op"].isin(["conv", "fc"])]
    if lay.empty:
        return empty(path, title)
    dense = lay.drop_duplicates(["benchmark", "layer"]).assign(series="dense", label="dense")
    dense["ops_left"] = dense["ops_dense"]
    data = pd.concat([dense, lay], ignore_index=True)
    data["ops_left"] = data["ops_left"].clip(lower=1.0)  # a layer with every op saved: drawn at 1 (log axis)
    order = list(dict.fromkeys(data["label"]))
    grid = sns.catplot(data=data, kind="point", x="layer", y="ops_left", hue="label", hue_order=order,
                       col="benchmark", col_wrap=2, sharex=False, sharey=False, height=3.6, aspect=1.6,
                       markersize=4, linewidth=1.0, palette=["#aaaaaa", "#333333"]
                       + sns.color_palette("tab10", len(order) - 2))
    for ax in grid.axes.flat:
        ax.set_yscale("log")
        ax.tick_params(axis="x", rotation=90, labelsize=7)
        ax.set_xlabel("")
    grid.set_ylabels("ops per image left")
    grid.figure.suptitle(title, y=1.02)
    grid.legend.set_title("")
    grid.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(grid.figure)


def main(sm) -> None:
    start_log(sm)
    df = pd.read_csv(sm.input[0])
    network(df, sm.output.network)
    layers(df, sm.output.layers)


main(snakemake)  # noqa: F821
