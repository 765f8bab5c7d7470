# Fetch: the data sets and the model files of every benchmark, mirror first, then the URL,
# checksums verified. A benchmark whose files cannot be had is not an error: its status file
# says "missing" with the reason (one line), and the checkpoint below leaves it out of the
# later stages, so that the other benchmarks go on and the report lists it as missing.


rule fetch_data:
    output:
        "resources/data/{data}/status.json",
    params:
        source=lambda wildcards: DATA_SOURCES[wildcards.data],
        mirror=MIRROR,
    log:
        "logs/fetch_data/{data}.log",
    resources:
        cpu_lock=1,
    conda:
        CONDA_ENV
    script:
        "../scripts/fetch_data.py"


rule fetch:
    input:
        data=lambda wildcards: expand(
            "resources/data/{data}/status.json", data=bench_data_keys(wildcards.bench)
        ),
    output:
        files=directory("resources/{bench}/files"),
        status="resources/{bench}/status.json",
    params:
        files=lambda wildcards: bench_files(wildcards.bench),
        format=lambda wildcards: config["benchmarks"][wildcards.bench]["format"],
        mirror=MIRROR,
        dyvedeep=DYVEDEEP,
    log:
        "logs/fetch/{bench}.log",
    resources:
        cpu_lock=1,
    conda:
        CONDA_ENV
    script:
        "../scripts/fetch.py"


checkpoint fetch_summary:
    input:
        expand("resources/{bench}/status.json", bench=BENCHMARKS),
    output:
        "results/status/fetch.json",
    params:
        benchmarks=BENCHMARKS,
    log:
        "logs/fetch_summary.log",
    resources:
        cpu_lock=1,
    localrule: True
    conda:
        CONDA_ENV
    script:
        "../scripts/fetch_summary.py"
