"""Snakemake script of rule `convert` (workflow/rules/merge.smk): the merged imatrix in another format."""

from typing import TYPE_CHECKING

import _paths  # noqa: F401

from imatrix.convert import convert_imatrix
from imatrix.workflow.joblog import job_logging

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

job_logging(snakemake.log[0])
convert_imatrix(
    snakemake.input.imatrix,
    snakemake.output.converted,
    output_format=snakemake.params.output_format,
    compat=snakemake.params.compat,
)
