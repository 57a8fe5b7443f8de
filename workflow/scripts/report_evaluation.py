"""Snakemake script of rule `report_evaluation` (workflow/rules/evaluate.smk): the evaluation summary as HTML for the report."""

from typing import TYPE_CHECKING

import _paths  # noqa: F401

from imatrix.workflow.joblog import job_logging
from imatrix.workflow.report import evaluation_table, write_html_report

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

job_logging(snakemake.log[0])
write_html_report(
    snakemake.output.html,
    f"Quantizations of {snakemake.wildcards.m}",
    {"Evaluation against the base model": snakemake.input.summary},
    shape=evaluation_table,
)
