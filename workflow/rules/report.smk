# Report: results/report.html, a self-contained Snakemake report of the tables, the plots with
# their captions, the paper's figures beside ours and the configuration used. The last job of
# `all` runs `snakemake --report` itself, with the effective configuration, so that a dry run
# has no side effects and a second `snakemake` does nothing.

REPORT_FILES = [
    "results/tables/summary.csv",
    "results/tables/summary.html",
    "results/tables/layers.csv",
    "results/tables/layers.html",
    "results/tables/missing.csv",
    "results/tables/paper_comparison.html",
    "results/tables/comparison.csv",
    "results/tables/comparison_exits.csv",
    "results/tables/comparison.html",
    "results/plots/op_reduction.png",
    "results/plots/layer_ops.png",
    "results/plots/tradeoff.png",
    "results/plots/latency.png",
    "results/plots/paper_vs_ours.png",
    "results/plots/comparison.png",
    "results/tables/headroom.csv",
    "results/tables/headroom.html",
    "results/tables/executed_macs.csv",
    "results/tables/executed_macs.html",
    "results/plots/headroom.png",
    "results/plots/headroom_layers.png",
    "results/config_used.yaml",
]


rule dump_config:
    output:
        report(
            "results/config_used.yaml",
            caption="../report/config.rst",
            category="3. Configuration",
            labels={"file": "config_used.yaml"},
        ),
    params:
        config=lambda wildcards: json.dumps(config, sort_keys=True),
    log:
        "logs/dump_config.log",
    resources:
        cpu_lock=1,
    localrule: True
    conda:
        CONDA_ENV
    script:
        "../scripts/dump_config.py"


# The report's front page (tables and plots inlined), included by workflow/report/workflow.rst.
rule report_front:
    input:
        summary="results/tables/summary.fragment.html",
        paper="results/tables/paper_comparison.fragment.html",
        comparison="results/tables/comparison.fragment.html",
        comparison_plot="results/plots/comparison.png",
        executed="results/tables/executed_macs.fragment.html",
        paper_plot="results/plots/paper_vs_ours.png",
        op_reduction="results/plots/op_reduction.png",
        tradeoff="results/plots/tradeoff.png",
        latency="results/plots/latency.png",
        layer_ops="results/plots/layer_ops.png",
    output:
        "results/report_front.html",
    log:
        "logs/report_front.log",
    resources:
        cpu_lock=1,
    localrule: True
    conda:
        CONDA_ENV
    script:
        "../scripts/front.py"


# The target of the nested `snakemake --report`: everything the report embeds.
rule report_content:
    input:
        REPORT_FILES,
        "results/report_front.html",
    localrule: True


rule report:
    input:
        [f for f in REPORT_FILES if f != "results/config_used.yaml"],
        front="results/report_front.html",
        config="results/config_used.yaml",
    output:
        "results/report.html",
    params:
        snakefile=workflow.main_snakefile,
        target="report_content",
    log:
        "logs/report.log",
    resources:
        cpu_lock=1,
    localrule: True
    conda:
        CONDA_ENV
    script:
        "../scripts/make_report.py"
