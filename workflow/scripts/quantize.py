"""Snakemake script of rule `quantize` (workflow/rules/quantize.smk): the base model quantized to one type."""

from typing import TYPE_CHECKING

import _paths  # noqa: F401

from imatrix.quantize import quantize
from imatrix.workflow.joblog import job_logging

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

job_logging(snakemake.log[0])
quantize(
    snakemake.input.model,
    snakemake.output.model,
    snakemake.wildcards.t,
    imatrix=snakemake.input.get("imatrix"),
    threads=snakemake.threads,
    allow_requantize=snakemake.params.allow_requantize,
)
