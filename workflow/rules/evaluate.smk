# Evaluate: top-1 of the dense engine and of DyVEDeep with the calibrated knobs on the test
# split, op counts per layer and knob (`dyvedeep eval`). Ops and accuracy do not depend on
# the machine, so the host evaluates once; the boards evaluate again in remote.smk.


rule evaluate:
    input:
        model="results/models/{bench}.onnx",
        knobs="results/knobs/{bench}.yaml",
    output:
        "results/eval/{bench}.json",
    params:
        dyvedeep=DYVEDEEP,
        data=lambda wildcards: data_spec(wildcards.bench, "test"),
        limit=limit_arg("test"),
        mirror=mirror_arg(),
    threads: JOB_THREADS
    log:
        "logs/evaluate/{bench}.log",
    resources:
        cpu_lock=1,
    conda:
        CONDA_ENV
    shell:
        "{params.dyvedeep} eval {input.model} --data {params.data:q} --knobs {input.knobs}"
        " --json {output} {params.limit} {params.mirror} --threads {threads} > {log} 2>&1"
