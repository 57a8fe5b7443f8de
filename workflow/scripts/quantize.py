"""Snakemake script of rules `quantize`, `quantize_noimatrix` and `quantize_plan` (workflow/rules/quantize.smk): the base model quantized to one type or with a plan's recipe."""

from typing import TYPE_CHECKING

import _paths  # noqa: F401

from imatrix.workflow.joblog import job_logging
from imatrix.workflow.steps import quantize_step

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

job_logging(snakemake.log[0])
quantize_step(
    snakemake.input.model,
    snakemake.output.model,
    snakemake.params.qtype,
    imatrix=snakemake.input.get("imatrix"),
    recipe=snakemake.input.get("recipe"),
    threads=snakemake.threads,
    allow_requantize=snakemake.params.allow_requantize,
)
