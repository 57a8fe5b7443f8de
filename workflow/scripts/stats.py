"""Snakemake script of rule `stats` (workflow/rules/stats.smk): statistics tables and plots of the merged imatrix."""

from typing import TYPE_CHECKING

import _paths  # noqa: F401

from imatrix.workflow.joblog import job_logging
from imatrix.workflow.steps import imatrix_statistics

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

job_logging(snakemake.log[0])
imatrix_statistics(
    snakemake.input.imatrix,
    snakemake.output.tensors,
    snakemake.output.layers,
    snakemake.output.plots,
)
