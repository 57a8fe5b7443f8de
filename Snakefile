# imatrix-pipeline: calibration text -> importance matrices -> quantized GGUF models.
# Thin on purpose: configuration, validation and target selection live in
# workflow/rules/common.smk, one rule per step of the data path in the other rule files.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/collect.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/stats.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    default_target: True
    input:
        all_targets,
