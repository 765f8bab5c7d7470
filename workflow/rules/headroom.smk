# Headroom: per benchmark, the ops an oracle would save with no output change (`dyvedeep
# headroom`, on the first images of the calibration split), then a table and plots of the
# achieved ops (the evaluation on the test split) against these ceilings.


# --limit N: headroom.images, capped by a reduced run's limit_calib (none: the whole split)
_HEADROOM_LIMITS = [n for n in (config["headroom"]["images"], config["limit_calib"]) if n]
HEADROOM_LIMIT = f"--limit {min(_HEADROOM_LIMITS)}" if _HEADROOM_LIMITS else ""


rule headroom:
    input:
        model="results/models/{bench}.onnx",
    output:
        json="results/headroom/{bench}.json",
        csv="results/headroom/{bench}.csv",
    params:
        dyvedeep=DYVEDEEP,
        data=lambda wildcards: data_spec(wildcards.bench, "calib"),
        limit=HEADROOM_LIMIT,
        mirror=mirror_arg(),
    log:
        "logs/headroom/{bench}.log",
    resources:
        cpu_lock=1,
    conda:
        CONDA_ENV
    shell:
        "{params.dyvedeep} headroom {input.model} --data {params.data:q} --json {output.json}"
        " --csv {output.csv} {params.limit} {params.mirror} > {log} 2>&1"


rule headroom_tables:
    input:
        headroom=lambda wildcards: [f"results/headroom/{b}.json" for b in ok_benchmarks()],
        evals=lambda wildcards: [f"results/eval/{b}.json" for b in ok_benchmarks()],
    output:
        csv=report(
            "results/tables/headroom.csv",
            caption="../report/headroom.rst",
            category="1. Results",
            subcategory="Headroom",
            labels={"table": "headroom (CSV)"},
        ),
        html=report(
            "results/tables/headroom.html",
            caption="../report/headroom.rst",
            category="1. Results",
            subcategory="Headroom",
            labels={"table": "headroom"},
        ),
    params:
        benchmarks=lambda wildcards: ok_benchmarks(),
    log:
        "logs/headroom_tables.log",
    resources:
        cpu_lock=1,
    conda:
        CONDA_ENV
    script:
        "../scripts/headroom_tables.py"


rule headroom_plots:
    input:
        "results/tables/headroom.csv",
    output:
        network=report(
            "results/plots/headroom.png",
            caption="../report/headroom_plot.rst",
            category="1. Results",
            subcategory="Headroom",
            labels={"plot": "achieved ops vs ceilings"},
        ),
        layers=report(
            "results/plots/headroom_layers.png",
            caption="../report/headroom_layers.rst",
            category="1. Results",
            subcategory="Headroom",
            labels={"plot": "achieved ops vs ceilings, per layer"},
        ),
    log:
        "logs/headroom_plots.log",
    resources:
        cpu_lock=1,
    conda:
        CONDA_ENV
    script:
        "../scripts/headroom_plots.py"
