"""Snakemake script of rule `dataset_text` (workflow/rules/prepare.smk): a JSONL/Parquet dataset as plain text."""

from typing import TYPE_CHECKING

import _paths  # noqa: F401

from imatrix.workflow.datasets import write_dataset_text
from imatrix.workflow.joblog import job_logging

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

job_logging(snakemake.log[0])
write_dataset_text(
    snakemake.input.data,
    snakemake.output.text,
    fmt=snakemake.params.settings["format"],
    text_column=snakemake.params.settings["text_column"],
)
