# DyVEDeep reproducibility pipeline:
#   fetch -> convert -> calibrate -> evaluate -> bench (x86, boards) -> tables -> plots -> report
#   (beside the knobs, on the benchmarks `compare` lists: decision gates and static pruning)
# Run `snakemake` (the workflow profile profiles/default sets the cores and the timing lock),
# `snakemake --profile profiles/pi` to add the Raspberry Pi board, `snakemake -n` to preview.
# The configuration is config/config.yaml, checked against workflow/schemas/config.schema.yaml.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/calibrate.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/compare.smk"
include: "workflow/rules/bench.smk"
include: "workflow/rules/remote.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/plots.smk"
include: "workflow/rules/headroom.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/failures.smk"


rule all:
    default_target: True
    input:
        "results/report.html",
