"""Snakemake script of rule `merge` (workflow/rules/merge.smk): all shards of a model into its imatrix."""

from typing import TYPE_CHECKING

import _paths  # noqa: F401

from imatrix.workflow.joblog import job_logging
from imatrix.workflow.merge import merge_shards

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

job_logging(snakemake.log[0])
merge_shards(
    list(snakemake.input.shards),
    list(snakemake.params.datasets),
    snakemake.output.imatrix,
    weights=snakemake.params.weights,
    health=snakemake.params.health,
)
