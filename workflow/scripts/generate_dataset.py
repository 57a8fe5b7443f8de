"""Snakemake script of rule `generate_dataset` (workflow/rules/prepare.smk): text the model writes itself."""

from typing import TYPE_CHECKING

import _paths  # noqa: F401

from imatrix.generate import GenerateSettings, generate_file
from imatrix.workflow.joblog import job_logging

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

job_logging(snakemake.log[0])
gen = snakemake.params.settings
generate_file(
    snakemake.input.model,
    snakemake.input.prompts,
    snakemake.output.data,
    GenerateSettings(
        tokens=gen["tokens"],
        seed=gen["seed"],
        temperature=gen["temperature"],
        threads=gen["threads"],
        ignore_eos=gen["ignore_eos"],
    ),
)
