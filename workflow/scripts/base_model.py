"""Snakemake script of rule `base_model` (workflow/rules/prepare.smk): requantize a packaged model to an F16 base."""

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
    "F16",
    threads=snakemake.threads,
    allow_requantize=True,
)
