"""Snakemake script of rule `tokenize` (workflow/rules/prepare.smk): a dataset's text to tokens."""

from typing import TYPE_CHECKING

import _paths  # noqa: F401

from imatrix.tokenize import tokenize_file
from imatrix.workflow.joblog import job_logging

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

job_logging(snakemake.log[0])
tokenize_file(
    snakemake.input.model,
    snakemake.input.text,
    snakemake.output.tokens,
    parse_special=snakemake.params.parse_special,
)
