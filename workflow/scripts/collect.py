"""Snakemake script of rule `collect` (workflow/rules/collect.smk): one shard of one dataset."""

from typing import TYPE_CHECKING

import _paths  # noqa: F401

from imatrix.workflow.joblog import job_logging
from imatrix.workflow.steps import collect_shard

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

job_logging(snakemake.log[0])
settings = snakemake.params.settings
collect_shard(
    snakemake.input.model,
    snakemake.input.tokens,
    snakemake.output.shard,
    dataset=snakemake.wildcards.d,
    shard=int(snakemake.wildcards.s),
    shards=snakemake.params.shards,
    chunks_per_shard=snakemake.params.chunks_per_shard,
    chunks=snakemake.params.chunks,
    n_ctx=settings["n_ctx"],
    n_batch=settings["n_batch"],
    n_ubatch=settings["n_ubatch"],
    process_output=settings["process_output"],
    ppl=settings["ppl"],
    ngl=snakemake.params.ngl,
    threads=snakemake.threads,
    output_frequency=snakemake.params.output_frequency,
    until_converged=settings["until_converged"],
)
