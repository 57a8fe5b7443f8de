"""``imatrix stats``: the statistics table (as ``llama-imatrix --show-statistics``), Parquet
files and plots of one imatrix."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from imatrix.cli import add_dat_chunk_size, add_verbosity, check_ctx_size
from imatrix.formats import read_imatrix
from imatrix.model import ImatrixData
from imatrix.stats import DEFAULT_ECS_K, PLOTTABLE, compute_statistics, render_tables, write_parquet

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "stats",
        help="per-tensor and per-layer statistics (table, Parquet, plots)",
        description="Print the statistics table llama-imatrix --show-statistics prints "
        "(the preferred table when the file has activation sums, else the legacy one), "
        "and optionally write tensors.parquet/layers.parquet and PNG plots.",
    )
    p.add_argument("input", metavar="IN", help="imatrix file (GGUF or .dat)")
    p.add_argument(
        "--parquet",
        metavar="DIR",
        help="write tensors.parquet and layers.parquet here, and for MoE models "
        "coverage.parquet (tokens per expert)",
    )
    p.add_argument("--plot", metavar="DIR", help="write PNG plots here")
    p.add_argument(
        "--statistic",
        action="append",
        choices=PLOTTABLE,
        metavar="COL",
        help="statistic to plot per layer and tensor kind (repeatable; default: a standard set)",
    )
    p.add_argument(
        "--legacy", action="store_true", help="print the legacy table even with activation sums"
    )
    p.add_argument("--no-table", action="store_true", help="do not print the table")
    p.add_argument(
        "--ecs-k",
        type=float,
        default=DEFAULT_ECS_K,
        help=f"ECS scale K (default {DEFAULT_ECS_K:g})",
    )
    add_dat_chunk_size(p)
    add_verbosity(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_ctx_size(args.ctx_size)
    data = read_imatrix(args.input, chunk_size=args.ctx_size)
    tensors, layers = compute_statistics(data, ecs_k=args.ecs_k)
    if not args.no_table:
        legacy = args.legacy or not bool(tensors["has_sums"].all())
        sys.stdout.write(
            render_tables(tensors, layers, args.input, legacy=legacy, ecs_k=args.ecs_k)
        )
    if args.parquet:
        tp, _ = write_parquet(tensors, layers, args.parquet)
        _write_coverage(data, tp.parent)
    if args.plot:
        from imatrix.plots import write_plots  # matplotlib only when plotting

        write_plots(data, tensors, args.plot, args.statistic)
    return 0


def _write_coverage(data: ImatrixData, outdir: Path) -> None:
    """coverage.parquet for a MoE imatrix; nothing for a dense one (no experts)."""
    from imatrix.coverage import COVERAGE_FILE, coverage_frame, write_coverage

    table = coverage_frame(data)
    if table.empty:
        log.info("no expert tensors: no %s", COVERAGE_FILE)
        return
    write_coverage(table, outdir / COVERAGE_FILE)
