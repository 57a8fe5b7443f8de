"""Snakemake script of rule `model_dataset_text` (workflow/rules/prepare.smk): a chat or generated dataset as the model's text."""

from typing import TYPE_CHECKING

import _paths  # noqa: F401

from imatrix.workflow.joblog import job_logging
from imatrix.workflow.model_datasets import write_model_dataset_text

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

job_logging(snakemake.log[0])
write_model_dataset_text(
    snakemake.input.get("model", ""),
    snakemake.input.data,
    snakemake.output.text,
    dataset=snakemake.wildcards.d,
    ds=snakemake.params.settings,
)
