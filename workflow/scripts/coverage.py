"""Snakemake script of rule `coverage` (workflow/rules/stats.smk): tokens per expert, merged and per dataset."""

from typing import TYPE_CHECKING

import _paths  # noqa: F401

from imatrix.coverage import write_run_coverage
from imatrix.workflow.joblog import job_logging

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

job_logging(snakemake.log[0])
write_run_coverage(
    snakemake.input.imatrix,
    list(snakemake.input.shards),
    list(snakemake.params.datasets),
    snakemake.output.coverage,
)
