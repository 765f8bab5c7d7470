# Bench on the host: per-image latency of the dense engine, DyVEDeep and onnxruntime, single
# thread and all cores (`dyvedeep bench`). A timing job holds every unit of `cpu_lock`, so no
# other job of this workflow runs beside it.


rule bench:
    input:
        model="results/models/{bench}.onnx",
        knobs="results/knobs/{bench}.yaml",
    output:
        "results/bench/{platform}/{bench}/t{threads}.json",
    params:
        dyvedeep=DYVEDEEP,
        data=lambda wildcards: data_spec(wildcards.bench, "test"),
        images=config["bench"]["images"],
        warmup=config["bench"]["warmup"],
        mirror=mirror_arg(),
    threads: lambda wildcards: int(wildcards.threads)
    log:
        "logs/bench/{platform}/{bench}.t{threads}.log",
    resources:
        cpu_lock=CPU_LOCK_ALL,
    conda:
        CONDA_ENV
    shell:
        "{params.dyvedeep} bench {input.model} --knobs {input.knobs}"
        " --threads {wildcards.threads} --data {params.data:q} --images {params.images}"
        " --warmup {params.warmup} {params.mirror} --json {output} > {log} 2>&1"
