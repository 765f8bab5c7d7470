"""The headroom table of the report: per benchmark, the network and each layer, the ops per image
that are left with the calibrated knobs (``achieved``, from `dyvedeep eval` on the test split)
and with each oracle ceiling of `dyvedeep headroom` (on the calibration split), and the op
reduction dense / left of each.

headroom.csv is long (one row per benchmark, scope, layer and series; every layer with dense
ops); headroom.html shows the reductions, the network first, then the conv / fc layers.
"""

import html
import math
import sys

import pandas as pd

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821
from _common import read_json, start_log  # noqa: E402
from dyvedeep.io_utils import write_text_atomic  # noqa: E402

COLUMNS = ["benchmark", "scope", "layer", "op", "series", "label", "images", "data",
           "ops_dense", "ops_left", "reduction"]
ACHIEVED = "achieved"
ACHIEVED_LABEL = "achieved (calibrated knobs, test split)"
STYLE = ("<style>body{font-family:sans-serif}table.dyve{border-collapse:collapse;margin-bottom:1em}"
         "table.dyve td,table.dyve th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
         "table.dyve td:first-child,table.dyve td:nth-child(2){text-align:left}</style>")


def reduction(dense: float, left: float) -> float:
    return dense / left if left > 0 else math.inf


def rows_of(bench: str, headroom: dict, evaluation: dict) -> list[dict]:
    """The rows of one benchmark: achieved and every ceiling, for the network and each layer."""
    labels = headroom["ceilings"]
    common = {"benchmark": bench, "images": headroom["n"], "data": headroom["data"]}

    def row(scope, layer, series, dense, left, images=None, data=None, op=""):
        return {**common, "scope": scope, "layer": layer, "op": op, "series": series,
                "label": ACHIEVED_LABEL if series == ACHIEVED else labels[series],
                "images": images if images is not None else common["images"],
                "data": data if data is not None else common["data"],
                "ops_dense": dense, "ops_left": left, "reduction": reduction(dense, left)}

    out = [row("network", "", ACHIEVED, evaluation["ops_dense"], evaluation["ops_dyvedeep"],
               evaluation["n"], evaluation["data"])]
    order = headroom["order"]
    out += [row("network", "", c, headroom["ops_dense"], headroom["ops_dense"] - headroom["saved"][c])
            for c in order]
    achieved = {r["layer"]: r for r in evaluation.get("layers", []) if r["knob"] == "all"}
    for layer in headroom["layers"]:
        name, dense, op = layer["layer"], layer["ops_dense"], layer["op"]
        if name in achieved:
            out.append(row("layer", name, ACHIEVED, dense, achieved[name]["ops_dyvedeep"],
                           evaluation["n"], evaluation["data"], op))
        out += [row("layer", name, c, dense, dense - layer["saved"][c], op=op) for c in order]
    return out


def wide(df: pd.DataFrame, index: list[str]) -> pd.DataFrame:
    """Reductions with one column per series (the labels), in the order met."""
    order = list(dict.fromkeys(df["label"]))
    table = df.pivot_table(index=index, columns="label", values="reduction", sort=False).reset_index()
    return table[index + order]


def fmt(value) -> str:
    if isinstance(value, float):
        return "all" if math.isinf(value) else f"{value:.2f}x" if value < 1e3 else f"{value:.3g}"
    return html.escape(str(value))


def html_table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in r) + "</tr>" for r in df.itertuples(index=False))
    return f'<table class="dyve"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def main(sm) -> None:
    start_log(sm)
    rows = []
    for bench, hpath, epath in zip(sm.params.benchmarks, sm.input.headroom, sm.input.evals):
        rows += rows_of(bench, read_json(hpath), read_json(epath))
    df = pd.DataFrame(rows, columns=COLUMNS)
    write_text_atomic(sm.output.csv, df.to_csv(index=False))
    if df.empty:
        body = "<p>No benchmark has results.</p>"
    else:
        net = df[df["scope"] == "network"].copy()
        images = net.groupby("benchmark", sort=False).apply(
            lambda g: f"{g.loc[g.series != ACHIEVED, 'images'].iloc[0]} ({g.loc[g.series != ACHIEVED, 'data'].iloc[0]})",
            include_groups=False)
        table = wide(net, ["benchmark"])
        table.insert(1, "ceilings measured on", table["benchmark"].map(images))
        table.insert(2, "dense ops per image", table["benchmark"].map(net.groupby("benchmark")["ops_dense"].first()))
        body = ("<p>Op reduction dense / left: with the calibrated knobs (achieved, on the test split) and with "
                "each oracle ceiling (no output changes; on the calibration split). 'all': every op of the layer "
                "saved.</p><h3>Network</h3>" + html_table(table)
                + "<h3>Conv and fully-connected layers</h3>"
                + html_table(wide(df[(df["scope"] == "layer") & df["op"].isin(["conv", "fc"])], ["benchmark", "layer"])))
    write_text_atomic(sm.output.html, "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>Headroom</title>"
               f"{STYLE}</head><body><h2>Headroom: achieved ops against the oracle ceilings</h2>{body}</body></html>\n")


main(snakemake)  # noqa: F821
