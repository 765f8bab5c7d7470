"""The executed-MACs table of the report (issue 15): per benchmark, for the network and each conv /
fully-connected layer, the MACs per image dense, counted with the calibrated knobs (the op model,
docs/ops.md) and executed by the kernels with them (``dyvedeep eval`` on the test split), their
ratios, and the part of the executed ones that the layers' knob-free reruns ran (a layer where
no knob fired for an image runs again on its knob-free path).

Outputs: executed_macs.csv (COLUMNS; scope "network" or "layer", knobs the layer's enabled
knobs), executed_macs.html (the network, then the layers with knobs, then those without) and
executed_macs.fragment.html (the network and the layers with knobs, for the front page). An
evaluation written before executed MACs were counted gives blanks, not a crash.
"""

import html
import math
import sys

import pandas as pd

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821
from _common import fragment, page, read_json, start_log  # noqa: E402
from dyvedeep.io_utils import write_text_atomic  # noqa: E402

COLUMNS = ["benchmark", "scope", "layer", "knobs", "macs_dense", "macs_counted", "macs_executed",
           "executed_per_counted", "executed_per_dense", "macs_fallback", "macs_executed_dense"]
#: Shown columns and their headers (MACs per image).
HEADERS = {"layer": "layer", "knobs": "knobs", "macs_dense": "dense", "macs_counted": "counted (knobs)",
           "macs_executed": "executed (knobs)", "executed_per_counted": "executed / counted",
           "executed_per_dense": "executed / dense", "macs_fallback": "of which knob-free reruns",
           "macs_executed_dense": "executed (dense engine)"}
NOTE = ("MACs per image on the test split. Counted: the op model's (docs/ops.md), with the calibrated "
        "knobs. Executed: the multiply-adds the kernels ran with them: a tile of the knob kernel runs "
        "every real output channel and position of its 8 x 32 block, stopped (SPET) and filled (SDSS) "
        "entries included; a layer where no knob fired for an image runs again on its knob-free path "
        "(of which knob-free reruns); a conv run band by band with its max-pooling runs the rows its "
        "bands share twice (also in the dense engine). Executed / counted above 1 is work the knobs "
        "skip on paper and not in time.")


def ratio(a, b):
    return a / b if a is not None and b else None


def row(bench: str, scope: str, layer: str, knobs: str, dense, counted, executed, fallback, executed_dense) -> dict:
    return {"benchmark": bench, "scope": scope, "layer": layer, "knobs": knobs, "macs_dense": dense,
            "macs_counted": counted, "macs_executed": executed,
            "executed_per_counted": ratio(executed, counted), "executed_per_dense": ratio(executed, dense),
            "macs_fallback": fallback, "macs_executed_dense": executed_dense}


def rows_of(bench: str, evaluation: dict) -> list[dict]:
    """The network's row and one per layer with MACs of one evaluation JSON."""
    layers = evaluation.get("layers") or []
    knobs: dict[str, list[str]] = {}
    for r in layers:
        if r.get("knob") not in (None, "all", "none"):
            knobs.setdefault(r["layer"], []).append(r["knob"])
    totals = [r for r in layers if r.get("knob") == "all"]
    fallback = (sum(r["fallback_macs_dyvedeep"] for r in totals)
                if totals and all("fallback_macs_dyvedeep" in r for r in totals) else None)
    out = [row(bench, "network", "", "", evaluation.get("macs_dense"), evaluation.get("macs_dyvedeep"),
               evaluation.get("executed_macs_dyvedeep"), fallback, evaluation.get("executed_macs_dense"))]
    for r in totals:
        if not r.get("macs_dense"):  # no MACs (pooling, ...), or an evaluation that predates them
            continue
        out.append(row(bench, "layer", r["layer"], "+".join(knobs.get(r["layer"], [])), r["macs_dense"],
                       r.get("macs_dyvedeep"), r.get("executed_macs_dyvedeep"), r.get("fallback_macs_dyvedeep"),
                       r.get("executed_macs_dense")))
    return out


def cell(col: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if col.startswith("macs_"):
        return f"{float(value) / 1e6:,.3f} M"
    if col.startswith("executed_per"):
        return f"{float(value):.3f}x"
    return html.escape(str(value))


def html_table(df: pd.DataFrame, columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(HEADERS.get(c, c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(c, r[c])}</td>" for c in columns) + "</tr>" for _, r in df.iterrows())
    return f'<table class="dyve"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def html_body(df: pd.DataFrame, with_plain_layers: bool) -> str:
    if df.empty:
        return "<p class='note'>No benchmark has results.</p>"
    shown = ["macs_dense", "macs_counted", "macs_executed", "executed_per_counted", "executed_per_dense",
             "macs_fallback", "macs_executed_dense"]
    layers = df[df["scope"] == "layer"]
    knobbed = layers["knobs"].fillna("") != ""
    parts = ["<h4>Network</h4>", html_table(df[df["scope"] == "network"], ["benchmark"] + shown),
             "<h4>Layers with knobs</h4>",
             html_table(layers[knobbed], ["benchmark", "layer", "knobs"] + shown) if knobbed.any()
             else "<p class='note'>No layer has a knob.</p>"]
    if with_plain_layers and (~knobbed).any():
        parts += ["<h4>Layers without knobs</h4>", html_table(layers[~knobbed], ["benchmark", "layer"] + shown)]
    parts.append(f"<p class='note'>{html.escape(NOTE)}</p>")
    return "".join(parts)


def main(sm) -> None:
    start_log(sm)
    rows = []
    for bench, path in zip(sm.params.benchmarks, sm.input.evals):
        rows += rows_of(bench, read_json(path))
    df = pd.DataFrame(rows, columns=COLUMNS)
    write_text_atomic(sm.output.csv, df.to_csv(index=False))
    print(df.to_string())
    write_text_atomic(sm.output.html, page("Executed and counted MACs", html_body(df, True)))
    write_text_atomic(sm.output.fragment, fragment(html_body(df, False)))


main(snakemake)  # noqa: F821
