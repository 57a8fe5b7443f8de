"""Snakemake script of rule `plot_evaluation` (workflow/rules/evaluate.smk): KL divergence against file size, stock and planned quants."""

from typing import TYPE_CHECKING

import _paths  # noqa: F401

from imatrix.workflow.joblog import job_logging
from imatrix.workflow.report import plot_evaluation

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

job_logging(snakemake.log[0])
plot_evaluation(snakemake.input.summary, snakemake.output.plot, title=snakemake.wildcards.m)
