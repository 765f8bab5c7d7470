"""The front page of the report: the paper-vs-ours table, the summary table (with what is
missing), the comparison with decision gates and static pruning, the executed and counted MACs
of the networks and of the layers with knobs, and the plots, as one HTML fragment with the
images inlined. The report's workflow description (workflow/report/workflow.rst) includes it,
so the report opens on the results. The tables come as fragments written by the
tables rules (no HTML is parsed here)."""
import base64
import html
import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821
from _common import start_log  # noqa: E402
from dyvedeep.io_utils import write_text_atomic  # noqa: E402

sm = snakemake  # noqa: F821
start_log(sm)


def included(path):
    """A fragment the tables rule wrote for this page, as it is."""
    with open(path, encoding="utf-8") as f:
        return f.read()


def image(path, alt):
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return (f'<figure class="dyve-plot"><img alt="{html.escape(alt)}" style="max-width:100%" '
            f'src="data:image/png;base64,{data}"/><figcaption>{html.escape(alt)}</figcaption></figure>')


parts = [
    '<div class="dyve-front">',
    "<h3>The paper's results beside ours</h3>",
    '<div style="overflow-x:auto">', included(sm.input.paper), "</div>",
    image(sm.input.paper_plot, "The paper's ranges (bars) and our benchmarks (points)"),
    "<h3>Summary</h3>",
    '<div style="overflow-x:auto">', included(sm.input.summary), "</div>",
    "<h3>Dense, static, dynamic and gated, side by side</h3>",
    '<div style="overflow-x:auto">', included(sm.input.comparison), "</div>",
    image(sm.input.comparison_plot, "Op reduction and top-1 loss per setting (comparison families)"),
    "<h3>Executed and counted MACs</h3>",
    '<div style="overflow-x:auto">', included(sm.input.executed), "</div>",
    "<h3>Plots</h3>",
    image(sm.input.op_reduction, "Ops removed per benchmark, by knob"),
    image(sm.input.tradeoff, "Calibration: accuracy loss against ops"),
    image(sm.input.latency, "Latency per image, per engine"),
    image(sm.input.layer_ops, "Ops per image of each layer"),
    "</div>",
]
write_text_atomic(sm.output[0], "\n".join(parts) + "\n")
