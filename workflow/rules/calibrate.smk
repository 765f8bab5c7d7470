# Calibrate: per layer and knob, the most aggressive thresholds whose calibration top-1 loss
# stays within the budget (`dyvedeep calibrate`), and the trace of every candidate tried.


rule calibrate:
    input:
        model="results/models/{bench}.onnx",
    output:
        knobs="results/knobs/{bench}.yaml",
        trace="results/calibration/{bench}.trace.csv",
    params:
        dyvedeep=DYVEDEEP,
        data=lambda wildcards: data_spec(wildcards.bench, "calib"),
        budget=config["budget"],
        limit=lambda wildcards: limit_arg("calib", wildcards.bench),
        mirror=mirror_arg(),
        options=lambda wildcards: calibrate_args(wildcards.bench),
    threads: job_threads
    priority: JOB_PRIORITY["calibrate"]
    log:
        "logs/calibrate/{bench}.log",
    resources:
        cpu_lock=job_cpu_lock,
    conda:
        CONDA_ENV
    shell:
        "{params.dyvedeep} calibrate {input.model} --data {params.data:q}"
        " --budget {params.budget} {params.options} -o {output.knobs} --trace {output.trace}"
        " {params.limit} {params.mirror} --threads {threads} > {log} 2>&1"
