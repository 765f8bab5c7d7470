# Boards over SSH (`dyvedeep remote`): set the board up once, ship the model, the knobs and the
# preprocessed test images (.npz), evaluate and bench there. Each job is tried twice
# (`retries: 1`); after the last failure it writes {"status": "missing", "reason": ...}
# instead of failing, so an unreachable board gives "missing" rows and the host's rows are
# still produced. Timings on an emulated board are labelled "emulated aarch64". The resource
# `remote_attempt` only tells the script which attempt it is.

rule remote_setup:
    output:
        "results/remote/{platform}/setup.json",
    params:
        mode="setup",
        ssh=ssh_params,
        dyvedeep=DYVEDEEP,
        retries=REMOTE_RETRIES,
    retries: REMOTE_RETRIES
    log:
        "logs/remote/{platform}/setup.log",
    resources:
        cpu_lock=1,
        remote_attempt=lambda wildcards, attempt: attempt,
    conda:
        CONDA_ENV
    script:
        "../scripts/remote.py"

rule export_npz:
    input:
        model="results/models/{bench}.onnx",
    output:
        "resources/{bench}/test.npz",
    params:
        data=lambda wildcards: data_spec(wildcards.bench, "test"),
        limit=config["limit_test"],
        mirror=MIRROR,
    log:
        "logs/export_npz/{bench}.log",
    resources:
        cpu_lock=1,
    conda:
        CONDA_ENV
    script:
        "../scripts/export_npz.py"

rule remote_eval:
    input:
        model="results/models/{bench}.onnx",
        knobs="results/knobs/{bench}.yaml",
        npz="resources/{bench}/test.npz",
        setup="results/remote/{platform}/setup.json",
    output:
        "results/remote/{platform}/eval/{bench}.json",
    params:
        mode="eval",
        ssh=ssh_params,
        dyvedeep=DYVEDEEP,
        retries=REMOTE_RETRIES,
    retries: REMOTE_RETRIES
    log:
        "logs/remote/{platform}/eval/{bench}.log",
    resources:
        cpu_lock=1,
        remote_attempt=lambda wildcards, attempt: attempt,
    conda:
        CONDA_ENV
    script:
        "../scripts/remote.py"

rule remote_bench:
    input:
        model="results/models/{bench}.onnx",
        knobs="results/knobs/{bench}.yaml",
        npz="resources/{bench}/test.npz",
        setup="results/remote/{platform}/setup.json",
    output:
        "results/remote/{platform}/bench/{bench}/t{threads}.json",
    params:
        mode="bench",
        ssh=ssh_params,
        engine_args=f"--images {config['bench']['images']} --warmup {config['bench']['warmup']}",
        dyvedeep=DYVEDEEP,
        retries=REMOTE_RETRIES,
    retries: REMOTE_RETRIES
    log:
        "logs/remote/{platform}/bench/{bench}.t{threads}.log",
    resources:
        # an emulated board shares this machine's cores: time it alone too
        cpu_lock=CPU_LOCK_ALL,
        remote_attempt=lambda wildcards, attempt: attempt,
    conda:
        CONDA_ENV
    script:
        "../scripts/remote.py"
