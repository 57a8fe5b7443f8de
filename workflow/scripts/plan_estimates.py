"""Snakemake script of rule `plan_estimates` (workflow/rules/plan.smk): the error estimates and sensitivities every plan of a model needs."""

from typing import TYPE_CHECKING

import _paths  # noqa: F401

from imatrix.workflow.joblog import job_logging
from imatrix.workflow.plans import plan_options, write_estimates

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

job_logging(snakemake.log[0])
write_estimates(
    snakemake.input.model,
    snakemake.input.imatrix,
    snakemake.params.plans,
    snakemake.output.estimates,
    plan_options(
        snakemake.params.settings,
        list(snakemake.input.texts),
        snakemake.params.eval_texts,
        threads=snakemake.threads,
    ),
)
