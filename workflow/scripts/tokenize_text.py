"""Snakemake script of rule `tokenize` (workflow/rules/prepare.smk): a dataset's text to tokens."""

from typing import TYPE_CHECKING

import _paths  # noqa: F401

from imatrix.sampling import Selection
from imatrix.tokenize import tokenize_file
from imatrix.workflow.joblog import job_logging

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

job_logging(snakemake.log[0])
sel = snakemake.params.selection or {}  # False: llama-imatrix's whole stream
tokenize_file(
    snakemake.input.model,
    snakemake.input.text,
    snakemake.output.tokens,
    parse_special=snakemake.params.parse_special,
    selection=Selection(sel["n_ctx"], sel["boundary"], sel["chunks"], sel["seed"]) if sel else None,
    fmt=sel.get("format", "auto"),
    text_column=sel.get("text_column", "text"),
    dataset=snakemake.wildcards.d,
)
