# Plots (seaborn): op reduction per benchmark split by knob, per-layer ops, the accuracy-vs-ops
# trade-off of calibration, latency per engine, and the paper's ranges beside ours.


rule plots:
    input:
        summary="results/tables/summary.csv",
        layers="results/tables/layers.csv",
        paper=PAPER_RESULTS,
        traces=trace_files,
    output:
        op_reduction=report(
            "results/plots/op_reduction.png",
            caption="../report/op_reduction.rst",
            category="1. Results",
            subcategory="Plots",
            labels={"plot": "op reduction by knob"},
        ),
        layer_ops=report(
            "results/plots/layer_ops.png",
            caption="../report/layer_ops.rst",
            category="1. Results",
            subcategory="Plots",
            labels={"plot": "ops per layer"},
        ),
        tradeoff=report(
            "results/plots/tradeoff.png",
            caption="../report/tradeoff.rst",
            category="1. Results",
            subcategory="Plots",
            labels={"plot": "accuracy vs ops (calibration)"},
        ),
        latency=report(
            "results/plots/latency.png",
            caption="../report/latency.rst",
            category="1. Results",
            subcategory="Plots",
            labels={"plot": "latency per engine"},
        ),
        paper=report(
            "results/plots/paper_vs_ours.png",
            caption="../report/paper_plot.rst",
            category="2. Paper vs ours",
            labels={"table": "paper vs ours (plot)"},
        ),
    params:
        benchmarks=lambda wildcards: ok_benchmarks(),
        platforms=platform_table(),
    log:
        "logs/plots.log",
    resources:
        cpu_lock=1,
    conda:
        CONDA_ENV
    script:
        "../scripts/plots.py"


rule compare_plot:
    input:
        "results/tables/comparison.csv",
    output:
        report(
            "results/plots/comparison.png",
            caption="../report/comparison_plot.rst",
            category="1. Results",
            subcategory="Comparison",
            labels={"plot": "op reduction and loss per setting"},
        ),
    params:
        budget=config["budget"],
    log:
        "logs/compare_plot.log",
    resources:
        cpu_lock=1,
    conda:
        CONDA_ENV
    script:
        "../scripts/compare_plot.py"
