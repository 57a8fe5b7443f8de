"""Snakemake script of rule `convergence` (workflow/rules/stats.smk): every shard's convergence record as a table and a plot."""

from typing import TYPE_CHECKING

import _paths  # noqa: F401

from imatrix.workflow.joblog import job_logging
from imatrix.workflow.steps import convergence_statistics

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

job_logging(snakemake.log[0])
convergence_statistics(
    snakemake.input.shards,
    snakemake.params.datasets,
    snakemake.output.table,
    snakemake.output.plot,
    eps=snakemake.params.eps,
)
