# Convert: Caffe / Deep Compression / OpenVINO files -> ONNX with the preprocessing in its
# metadata (`dyvedeep convert SOURCE WEIGHTS -o MODEL.onnx --preset P [--mean FILE]`).

rule convert:
    input:
        files="resources/{bench}/files",
        status="resources/{bench}/status.json",
    output:
        "results/models/{bench}.onnx",
    params:
        dyvedeep=DYVEDEEP,
        source=convert_source,
        weights=lambda wildcards: bench_file(wildcards.bench, "weights"),
        preset=lambda wildcards: config["benchmarks"][wildcards.bench]["preset"],
        mean=convert_mean,
    log:
        "logs/convert/{bench}.log",
    resources:
        cpu_lock=1,
    conda:
        CONDA_ENV
    shell:
        "{params.dyvedeep} convert {params.source} {params.weights} -o {output}"
        " --preset {params.preset} {params.mean} > {log} 2>&1"
