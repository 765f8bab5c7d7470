# Tables: one summary row per benchmark, platform and thread setting (missing benchmarks and
# unreachable boards give rows without numbers, listed with their reason in missing.csv), the
# per-layer ops, and our results beside the paper's; the comparison families; the executed and
# counted MACs.


rule tables:
    input:
        results=result_files,
        paper=PAPER_RESULTS,
    output:
        summary=report(
            "results/tables/summary.csv",
            caption="../report/summary.rst",
            category="1. Results",
            subcategory="Tables",
            labels={"table": "summary (CSV)"},
        ),
        summary_html=report(
            "results/tables/summary.html",
            caption="../report/summary.rst",
            category="1. Results",
            subcategory="Tables",
            labels={"table": "summary"},
        ),
        layers=report(
            "results/tables/layers.csv",
            caption="../report/layers.rst",
            category="1. Results",
            subcategory="Tables",
            labels={"table": "layers (CSV)"},
        ),
        layers_html=report(
            "results/tables/layers.html",
            caption="../report/layers.rst",
            category="1. Results",
            subcategory="Tables",
            labels={"table": "layers"},
        ),
        missing=report(
            "results/tables/missing.csv",
            caption="../report/missing.rst",
            category="1. Results",
            subcategory="Tables",
            labels={"table": "missing"},
        ),
        paper=report(
            "results/tables/paper_comparison.html",
            caption="../report/paper_table.rst",
            category="2. Paper vs ours",
            labels={"table": "paper vs ours"},
        ),
        paper_csv="results/tables/paper_comparison.csv",
        summary_fragment="results/tables/summary.fragment.html",
        paper_fragment="results/tables/paper_comparison.fragment.html",
    params:
        plan=lambda wildcards: result_plan(),
        platforms=platform_table(),
    log:
        "logs/tables.log",
    resources:
        cpu_lock=1,
    conda:
        CONDA_ENV
    script:
        "../scripts/tables.py"


# The comparison families beside the knobs (compare.smk): one table per benchmark that has one
# on, dense / static / dynamic / gated side by side; empty when none is on.
rule compare_tables:
    input:
        compare_files,
    output:
        csv=report(
            "results/tables/comparison.csv",
            caption="../report/comparison.rst",
            category="1. Results",
            subcategory="Comparison",
            labels={"table": "dense, static, dynamic, gates (CSV)"},
        ),
        exits=report(
            "results/tables/comparison_exits.csv",
            caption="../report/comparison.rst",
            category="1. Results",
            subcategory="Comparison",
            labels={"table": "exit rate per gate (CSV)"},
        ),
        html=report(
            "results/tables/comparison.html",
            caption="../report/comparison.rst",
            category="1. Results",
            subcategory="Comparison",
            labels={"table": "dense, static, dynamic, gates"},
        ),
        fragment="results/tables/comparison.fragment.html",
    params:
        plan=lambda wildcards: compare_plan(),
        budgets={
            "knobs": config["budget"],
            "gates": compare_budget("gates"),
            "gates_knobs": gates_budget("gates_knobs"),
            "prune": compare_budget("prune"),
        },
    log:
        "logs/compare_tables.log",
    resources:
        cpu_lock=1,
    conda:
        CONDA_ENV
    script:
        "../scripts/compare_tables.py"


# Executed and counted MACs (issue 15): per benchmark, the network and each conv / fc layer, the
# MACs the op model counts with the calibrated knobs beside those the kernels ran.
rule executed_tables:
    input:
        evals=lambda wildcards: [f"results/eval/{b}.json" for b in ok_benchmarks()],
    output:
        csv=report(
            "results/tables/executed_macs.csv",
            caption="../report/executed_macs.rst",
            category="1. Results",
            subcategory="Executed MACs",
            labels={"table": "executed and counted MACs (CSV)"},
        ),
        html=report(
            "results/tables/executed_macs.html",
            caption="../report/executed_macs.rst",
            category="1. Results",
            subcategory="Executed MACs",
            labels={"table": "executed and counted MACs"},
        ),
        fragment="results/tables/executed_macs.fragment.html",
    params:
        benchmarks=lambda wildcards: ok_benchmarks(),
    log:
        "logs/executed_tables.log",
    resources:
        cpu_lock=1,
    conda:
        CONDA_ENV
    script:
        "../scripts/executed_tables.py"
