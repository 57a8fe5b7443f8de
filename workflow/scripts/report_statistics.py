"""Snakemake script of rule `report_statistics` (workflow/rules/stats.smk): the statistics tables as HTML for the report."""

from typing import TYPE_CHECKING

import _paths  # noqa: F401

from imatrix.workflow.joblog import job_logging
from imatrix.workflow.report import write_html_report

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

job_logging(snakemake.log[0])
write_html_report(
    snakemake.output.html,
    f"imatrix statistics of {snakemake.wildcards.m}",
    {
        "Layers": snakemake.input.layers,
        "Tensors": snakemake.input.tensors,
        "Convergence (every shard's record and the merged view)": snakemake.input.convergence,
    },
)
