"""The comparison plot of the report (seaborn): per benchmark of comparison.csv, each setting
(dense, static, dynamic, gates and the combinations) as a point at its op reduction and its
top-1 loss on the test split, with the 95 % interval of the loss as a bar and the knobs' budget
as a line. Estimated op counts (a pruned net with the knobs) are hollow markers. Without rows it
says so instead of failing."""

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821
from _common import start_log  # noqa: E402

DPI = 110
sns.set_theme(style="whitegrid", context="notebook")
TITLE = "Op reduction and top-1 loss: dense, static, dynamic, gates"
#: A marker per kind of setting, so that settings at the same point stay visible.
MARKERS = {"dense": "o", "knobs": "D", "gates": "^", "gates_knobs": "v"}


def marker(setting: str) -> str:
    if setting.startswith("pruned_"):
        return "P" if setting.endswith("_knobs") else "s"
    return MARKERS.get(setting, "o")


def main(sm) -> None:
    start_log(sm)
    table = pd.read_csv(sm.input[0])
    if table.empty:
        fig, ax = plt.subplots(figsize=(6, 2.5))
        ax.axis("off")
        ax.set_title(TITLE)
        ax.text(0.5, 0.5, "no comparison family ran (config: compare)", ha="center", va="center", color="#666")
        fig.savefig(sm.output[0], dpi=DPI, bbox_inches="tight")
        plt.close(fig)
        return
    benches = list(dict.fromkeys(table["benchmark"]))
    labels = list(dict.fromkeys(table["label"]))
    palette = dict(zip(labels, sns.color_palette("deep", len(labels))))
    fig, axes = plt.subplots(1, len(benches), figsize=(5.2 * len(benches) + 2.5, 4.2), squeeze=False)
    for ax, bench in zip(axes[0], benches):
        df = table[table["benchmark"] == bench]
        for _, r in df.iterrows():
            color = palette[r["label"]]
            estimated = bool(r["ops_estimated"])
            ax.errorbar(r["ops_reduction"], r["top1_loss_pt"],
                        yerr=[[r["top1_loss_pt"] - r["loss_ci_low"]], [r["loss_ci_high"] - r["top1_loss_pt"]]],
                        fmt=marker(r["setting"]), ms=9, capsize=3, color=color, alpha=0.85,
                        mfc="none" if estimated else color, label=r["label"])
        ax.axhline(sm.params.budget, ls="--", color="#888", lw=1, label=f"budget {sm.params.budget} pt")
        ax.axhline(0, color="#444", lw=0.8)
        ax.set_title(bench)
        ax.set_xlabel("op reduction (dense ops / ops)")
        ax.set_ylabel("top-1 loss, pt (test split, 95 % CI)")
    handles, names = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle(TITLE)
    fig.tight_layout()
    fig.savefig(sm.output[0], dpi=DPI, bbox_inches="tight")
    plt.close(fig)


main(snakemake)  # noqa: F821
