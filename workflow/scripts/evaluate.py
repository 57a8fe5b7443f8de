"""Snakemake script of rule `evaluate` (workflow/rules/evaluate.smk): the quantized models against their base."""

from typing import TYPE_CHECKING

import _paths  # noqa: F401

from imatrix.workflow.joblog import job_logging
from imatrix.workflow.steps import evaluate_quants

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

job_logging(snakemake.log[0])
evaluate_quants(
    snakemake.input.base,
    list(snakemake.input.quants),
    dict(zip(snakemake.params.sets, snakemake.input.texts, strict=True)),
    snakemake.output.summary,
    n_ctx=snakemake.params.n_ctx,
    chunks=snakemake.params.chunks,
    threads=snakemake.threads,
    ngl=snakemake.params.ngl,
    recipes=snakemake.params.recipes,
)
