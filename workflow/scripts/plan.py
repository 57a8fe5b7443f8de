"""Snakemake script of rule `plan` (workflow/rules/plan.smk): one plan's recipe, from the model's shared estimates."""

from typing import TYPE_CHECKING

import _paths  # noqa: F401

from imatrix.workflow.joblog import job_logging
from imatrix.workflow.plans import plan_options, plan_recipe

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

job_logging(snakemake.log[0])
plan_recipe(
    snakemake.input.model,
    snakemake.input.imatrix,
    snakemake.input.estimates,
    snakemake.params.plan,
    snakemake.output.recipe,
    plan_options(
        snakemake.params.settings,
        list(snakemake.input.texts),
        snakemake.params.eval_texts,
        threads=snakemake.threads,
        quant_output=snakemake.params.quant_output,
    ),
)
