# imatrix-pipeline: calibration text -> importance matrices -> quantized GGUF models.
# Thin on purpose: configuration, validation and target selection live in
# workflow/rules/common.smk, one rule per step of the data path in the other rule files.

from snakemake.utils import min_version

min_version("9.0")


# The demo's config, only when the user gives none: `--configfile my.yaml` replaces it
# instead of being merged into it. (--replace-workflow-config would do the same in this
# process, but Snakemake does not pass that flag on to the processes of cluster jobs,
# which re-read this file: there the demo's datasets would come back.)
if not workflow.overwrite_configfiles:

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
