# The comparison families of issue 17 beside the three knobs (beyond the specification), on the
# benchmarks `compare` lists: decision gates (`dyvedeep gates`, docs/gates.md) alone and on top of
# the calibrated knobs; static pruning (`dyvedeep prune`, docs/pruning.md) by each method, then
# the knobs calibrated on the pruned net. Each setting is evaluated on the test split; the
# comparison table (tables.smk) sets them beside dense and the knobs.


# Gates: alone (gates), or on top of the calibrated knobs (gates_knobs; its budget covers knobs
# and gates together: gates_budget, gates_risk_arg). The gates' weights go beside the knob file
# (<stem>.gates.npz; none when no gate is kept); the knob file names them with their checksum.
rule gates:
    input:
        model="results/models/{bench}.onnx",
        knobs=lambda wildcards: (
            [f"results/knobs/{wildcards.bench}.yaml"] if wildcards.setting == "gates_knobs" else []
        ),
    output:
        knobs=gate_knobs_file("{bench}", "{setting}"),
    wildcard_constraints:
        setting="|".join(GATE_SETTINGS),
    params:
        dyvedeep=DYVEDEEP,
        data=lambda wildcards: data_spec(wildcards.bench, "calib"),
        budget=lambda wildcards: gates_budget(wildcards.setting),
        on_knobs=lambda wildcards, input: f"--knobs {input.knobs}" if input.knobs else "",
        risk=lambda wildcards: gates_risk_arg(wildcards.bench, wildcards.setting),
        loss=config["compare"]["gates"]["loss"],
        confidence=config["compare"]["gates"]["confidence"],
        limit=gates_limit_arg(),
        mirror=mirror_arg(),
    threads: job_threads
    priority: JOB_PRIORITY["gates"]
    log:
        "logs/gates/{bench}/{setting}.log",
    resources:
        cpu_lock=job_cpu_lock,
    conda:
        CONDA_ENV
    shell:
        "{params.dyvedeep} gates {input.model} --data {params.data:q} --budget {params.budget}"
        " {params.on_knobs} {params.risk} --loss {params.loss} --confidence {params.confidence}"
        " -o {output.knobs} {params.limit} {params.mirror} --threads {threads} > {log} 2>&1"


rule evaluate_gates:
    input:
        model="results/models/{bench}.onnx",
        knobs=gate_knobs_file("{bench}", "{setting}"),
    output:
        compare_eval_file("{bench}", "{setting}"),
    wildcard_constraints:
        setting="|".join(GATE_SETTINGS),
    params:
        dyvedeep=DYVEDEEP,
        data=lambda wildcards: data_spec(wildcards.bench, "test"),
        limit=limit_arg("test"),
        mirror=mirror_arg(),
    threads: job_threads
    log:
        "logs/evaluate/{bench}/{setting}.log",
    resources:
        cpu_lock=job_cpu_lock,
    conda:
        CONDA_ENV
    shell:
        "{params.dyvedeep} eval {input.model} --data {params.data:q} --knobs {input.knobs}"
        " --json {output} {params.limit} {params.mirror} --threads {threads} > {log} 2>&1"


# Static pruning (`dyvedeep prune`): magnitude pruning without retraining by one method (unstructured, fan-in), the
# density per layer chosen by calibrate's greedy search within the budget; the summary holds
# the densities and the calibration figures.
rule prune:
    input:
        model="results/models/{bench}.onnx",
    output:
        model=pruned_model_file("{bench}", "{method}"),
        summary=pruned_summary_file("{bench}", "{method}"),
    params:
        dyvedeep=DYVEDEEP,
        data=lambda wildcards: data_spec(wildcards.bench, "calib"),
        options=lambda wildcards: prune_args(wildcards.bench),
        limit=lambda wildcards: limit_arg("calib", wildcards.bench),
        mirror=mirror_arg(),
    threads: job_threads
    priority: JOB_PRIORITY["prune"]
    log:
        "logs/prune/{bench}/{method}.log",
    resources:
        cpu_lock=job_cpu_lock,
    conda:
        CONDA_ENV
    shell:
        "{params.dyvedeep} prune {input.model} --data {params.data:q} --method {wildcards.method}"
        " {params.options} -o {output.model} --summary {output.summary} {params.limit}"
        " {params.mirror} --threads {threads} > {log} 2>&1"


# The knobs on top of a pruned net: calibrated on it as on the dense one (the benchmark's
# settings but compare.prune.knob_passes, the global budget; the pruned net is the reference of
# its criterion).
rule calibrate_pruned:
    input:
        model=pruned_model_file("{bench}", "{method}"),
    output:
        knobs=pruned_knobs_file("{bench}", "{method}"),
        trace=pruned_trace_file("{bench}", "{method}"),
    params:
        dyvedeep=DYVEDEEP,
        data=lambda wildcards: data_spec(wildcards.bench, "calib"),
        budget=config["budget"],
        limit=lambda wildcards: limit_arg("calib", wildcards.bench),
        mirror=mirror_arg(),
        options=lambda wildcards: calibrate_args(wildcards.bench, config["compare"]["prune"]["knob_passes"]),
    threads: job_threads
    priority: JOB_PRIORITY["calibrate_pruned"]
    log:
        "logs/calibrate/{bench}/pruned_{method}.log",
    resources:
        cpu_lock=job_cpu_lock,
    conda:
        CONDA_ENV
    shell:
        "{params.dyvedeep} calibrate {input.model} --data {params.data:q}"
        " --budget {params.budget} {params.options} -o {output.knobs} --trace {output.trace}"
        " {params.limit} {params.mirror} --threads {threads} > {log} 2>&1"


# A pruned net alone (the dense engine on it) and with its knobs, in one evaluation; the per-image
# results pair its losses with the dense net's (evaluate).
rule evaluate_pruned:
    input:
        model=pruned_model_file("{bench}", "{method}"),
        knobs=pruned_knobs_file("{bench}", "{method}"),
    output:
        json=compare_eval_file("{bench}", "pruned_{method}"),
        images=compare_images_file("{bench}", "pruned_{method}"),
    params:
        dyvedeep=DYVEDEEP,
        data=lambda wildcards: data_spec(wildcards.bench, "test"),
        limit=limit_arg("test"),
        mirror=mirror_arg(),
    threads: job_threads
    log:
        "logs/evaluate/{bench}/pruned_{method}.log",
    resources:
        cpu_lock=job_cpu_lock,
    conda:
        CONDA_ENV
    shell:
        "{params.dyvedeep} eval {input.model} --data {params.data:q} --knobs {input.knobs}"
        " --json {output.json} --per-image {output.images} {params.limit} {params.mirror}"
        " --threads {threads} > {log} 2>&1"
