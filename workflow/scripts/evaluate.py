"""Snakemake script of rule `evaluate` (workflow/rules/evaluate.smk): the quantized models against their base."""

from typing import TYPE_CHECKING

import _paths  # noqa: F401

from imatrix.evaluate import evaluate
from imatrix.workflow_helpers import job_logging

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

job_logging(snakemake.log[0])
evaluate(
    snakemake.input.base,
    list(snakemake.input.quants),
    snakemake.input.text,
    n_ctx=snakemake.params.n_ctx,
    chunks=snakemake.params.chunks,
    threads=snakemake.threads,
    n_gpu_layers=snakemake.config["evaluate"]["ngl"],
    output=snakemake.output.summary,
)
