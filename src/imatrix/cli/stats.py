"""``imatrix stats``: the statistics table (as ``llama-imatrix --show-statistics``), Parquet
files and plots of one imatrix."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from imatrix.cli import add_dat_chunk_size, add_verbosity, check_ctx_size
from imatrix.convergence import (
    DEFAULT_EPS,
    DEFAULT_PATIENCE,
    ConvergenceLog,
    StopRule,
    parse_stop_rule,
)
from imatrix.convergence_table import (
    CONVERGENCE_FILE,
    CONVERGENCE_PLOT,
    convergence_table,
    read_log,
    verdict,
    write_convergence_parquet,
)
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
    p.add_argument(
        "--converged",
        type=_stop_rule,
        default=StopRule(DEFAULT_EPS, DEFAULT_PATIENCE),
        metavar="EPS[:PATIENCE]",
        help="rule for 'converged after N tokens': the first record ending PATIENCE "
        "consecutive records whose largest 1-cos change is below EPS, i.e. where collect "
        f"--until-converged EPS:PATIENCE stops (default {DEFAULT_EPS:g}:{DEFAULT_PATIENCE})",
    )
    add_dat_chunk_size(p)
    add_verbosity(p)
    p.set_defaults(run=run)


def _stop_rule(text: str) -> StopRule:
    try:
        return parse_stop_rule(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    check_ctx_size(args.ctx_size)
    data = read_imatrix(args.input, chunk_size=args.ctx_size)
    tensors, layers = compute_statistics(data, ecs_k=args.ecs_k)
    if not args.no_table:
        legacy = args.legacy or not bool(tensors["has_sums"].all())
        sys.stdout.write(
            render_tables(tensors, layers, args.input, legacy=legacy, ecs_k=args.ecs_k)
        )
    conv = read_log(data, args.input)
    if conv is not None:  # nothing for other files: the table stays llama-imatrix's
        sys.stdout.write(verdict(conv, args.converged) + "\n")
    if args.parquet:
        tp, _ = write_parquet(tensors, layers, args.parquet)
        _write_coverage(data, tp.parent)
    if args.plot:
        from imatrix.plots import write_plots  # matplotlib only when plotting

        write_plots(data, tensors, args.plot, args.statistic)
    if conv is not None and conv.records:
        _convergence_files(args, conv, data.datasets)
    return 0


def _write_coverage(data: ImatrixData, outdir: Path) -> None:
    """coverage.parquet for a MoE imatrix; nothing for a dense one (no experts)."""
    from imatrix.coverage import COVERAGE_FILE, coverage_frame, write_coverage

    table = coverage_frame(data)
    if table.empty:
        log.info("no expert tensors: no %s", COVERAGE_FILE)
        return
    write_coverage(table, outdir / COVERAGE_FILE)


def _convergence_files(args: argparse.Namespace, conv: ConvergenceLog, datasets: list[str]) -> None:
    """``convergence.parquet`` and ``convergence.png`` beside the other outputs."""
    table = convergence_table([(datasets[-1] if datasets else "", None, conv)])
    if args.parquet:
        write_convergence_parquet(table, Path(args.parquet) / CONVERGENCE_FILE)
    if args.plot:
        from imatrix.convergence_plot import plot_convergence

        title = f"convergence of {Path(args.input).name}"
        plot_convergence(
            table, Path(args.plot) / CONVERGENCE_PLOT, eps=args.converged.eps, title=title
        )
