"""Snakemake script of rule `report_statistics` (workflow/rules/stats.smk): the statistics tables as HTML for the report."""

from typing import TYPE_CHECKING

import _paths  # noqa: F401

from imatrix.workflow.joblog import job_logging
from imatrix.workflow.report import write_statistics_report

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

job_logging(snakemake.log[0])
write_statistics_report(
    snakemake.output.html,
    snakemake.wildcards.m,
    snakemake.input.tensors,
    snakemake.input.layers,
    snakemake.input.coverage,
    snakemake.params.min_expert_tokens,
    snakemake.input.convergence,
)
