# Evaluate: top-1 of the dense engine and of DyVEDeep with the calibrated knobs on the test
# split, op counts per layer and knob (`dyvedeep eval`); the per-image results too (the dense
# reference that the pruned nets of compare.smk are paired with). Ops and accuracy do not depend on
# the machine, so the host evaluates once; the boards evaluate again in remote.smk.
# With `eval_shard_size` set, the test split is evaluated in shards of that many images (one
# job each: `dyvedeep eval --images A:B --per-image`), whose per-image results are merged
# before the summary is computed (`dyvedeep eval-merge`): the same result, bit for bit.


if config["eval_shard_size"]:

    # The shards of the test split: its size is known once the data can be opened (quick: it
    # runs where Snakemake runs, not as a cluster job).
    checkpoint eval_ranges:
        input:
            model="results/models/{bench}.onnx",
        output:
            "results/eval/{bench}/ranges.json",
        params:
            data=lambda wildcards: data_spec(wildcards.bench, "test"),
            limit=config["limit_test"],
            size=config["eval_shard_size"],
            mirror=MIRROR,
        log:
            "logs/evaluate/{bench}/ranges.log",
        resources:
            cpu_lock=1,
        localrule: True
        conda:
            CONDA_ENV
        script:
            "../scripts/eval_ranges.py"

    rule evaluate_shard:
        input:
            model="results/models/{bench}.onnx",
            knobs="results/knobs/{bench}.yaml",
        output:
            "results/eval/{bench}/images/{start}-{stop}.json",
        wildcard_constraints:
            start=r"\d+",
            stop=r"\d+",
        params:
            dyvedeep=DYVEDEEP,
            data=lambda wildcards: data_spec(wildcards.bench, "test"),
            limit=limit_arg("test"),
            mirror=mirror_arg(),
        threads: job_threads
        log:
            "logs/evaluate/{bench}/{start}-{stop}.log",
        resources:
            cpu_lock=job_cpu_lock,
        conda:
            CONDA_ENV
        shell:
            "{params.dyvedeep} eval {input.model} --data {params.data:q} --knobs {input.knobs}"
            " --images {wildcards.start}:{wildcards.stop} --per-image {output}"
            " {params.limit} {params.mirror} --threads {threads} > {log} 2>&1"

    rule evaluate:
        input:
            model="results/models/{bench}.onnx",
            knobs="results/knobs/{bench}.yaml",
            # the shards listed by the eval_ranges checkpoint
            shards=lambda wildcards: [
                f"results/eval/{wildcards.bench}/images/{a}-{b}.json"
                for a, b in json.loads(
                    Path(checkpoints.eval_ranges.get(bench=wildcards.bench).output[0]).read_text()
                )["ranges"]
            ],
        output:
            json="results/eval/{bench}.json",
            images=eval_images_file("{bench}"),
        params:
            dyvedeep=DYVEDEEP,
        log:
            "logs/evaluate/{bench}.log",
        resources:
            cpu_lock=1,
        conda:
            CONDA_ENV
        shell:
            "{params.dyvedeep} eval-merge {input.model} {input.shards} --knobs {input.knobs}"
            " --json {output.json} --per-image {output.images} > {log} 2>&1"

else:

    rule evaluate:
        input:
            model="results/models/{bench}.onnx",
            knobs="results/knobs/{bench}.yaml",
        output:
            json="results/eval/{bench}.json",
            images=eval_images_file("{bench}"),
        params:
            dyvedeep=DYVEDEEP,
            data=lambda wildcards: data_spec(wildcards.bench, "test"),
            limit=limit_arg("test"),
            mirror=mirror_arg(),
        threads: job_threads
        log:
            "logs/evaluate/{bench}.log",
        resources:
            cpu_lock=job_cpu_lock,
        conda:
            CONDA_ENV
        shell:
            "{params.dyvedeep} eval {input.model} --data {params.data:q} --knobs {input.knobs}"
            " --json {output.json} --per-image {output.images} {params.limit} {params.mirror}"
            " --threads {threads} > {log} 2>&1"
