"""The front page of the report: the paper-vs-ours table, the summary table (with what is
missing) and the plots, as one HTML fragment with the images inlined. The report's workflow
description (workflow/report/workflow.rst) includes it, so the report opens on the results."""
import base64
import html
import re
import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821
from _common import start_log, write_text  # noqa: E402

sm = snakemake  # noqa: F821
start_log(sm)


def body_of(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"<body>(.*)</body>", text, re.S)
    inner = match.group(1) if match else text
    return re.sub(r"<h2>.*?</h2>", "", inner, count=1, flags=re.S)


def style_of(path):
    with open(path, encoding="utf-8") as f:
        match = re.search(r"<style>(.*?)</style>", f.read(), re.S)
    # the page's body rule would restyle the whole report: keep the table rules only
    rules = match.group(1) if match else ""
    return "\n".join(ln for ln in rules.splitlines() if not ln.strip().startswith("body"))


def image(path, alt):
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return (f'<figure class="dyve-plot"><img alt="{html.escape(alt)}" style="max-width:100%" '
            f'src="data:image/png;base64,{data}"/><figcaption>{html.escape(alt)}</figcaption></figure>')


parts = [
    f"<style>{style_of(sm.input.summary)}</style>",
    '<div class="dyve-front">',
    "<h3>The paper's results beside ours</h3>",
    '<div style="overflow-x:auto">', body_of(sm.input.paper), "</div>",
    image(sm.input.paper_plot, "The paper's ranges (bars) and our benchmarks (points)"),
    "<h3>Summary</h3>",
    '<div style="overflow-x:auto">', body_of(sm.input.summary), "</div>",
    "<h3>Plots</h3>",
    image(sm.input.op_reduction, "Ops removed per benchmark, by knob"),
    image(sm.input.tradeoff, "Calibration: accuracy loss against ops"),
    image(sm.input.latency, "Latency per image, per engine"),
    image(sm.input.layer_ops, "Ops per image of each layer"),
    "</div>",
]
write_text(sm.output[0], "\n".join(parts) + "\n")
