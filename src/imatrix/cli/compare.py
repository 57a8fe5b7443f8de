"""``imatrix compare A B``: how much two imatrices (e.g. two calibration sets) differ."""

from __future__ import annotations

import argparse
import sys

from imatrix.cli import add_dat_chunk_size, add_verbosity, check_ctx_size
from imatrix.errors import ImatrixError
from imatrix.formats import read_imatrix
from imatrix.stats import compare_imatrices, render_comparison, write_comparison_parquet


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "compare",
        help="compare two imatrices per tensor (cosine similarity, rank correlation)",
    )
    p.add_argument("a", metavar="A", help="first imatrix (GGUF or .dat)")
    p.add_argument("b", metavar="B", help="second imatrix (GGUF or .dat)")
    p.add_argument("--parquet", metavar="FILE", help="write the per-tensor comparison here")
    p.add_argument("--plot", metavar="FILE", help="write a PNG heat map here")
    add_dat_chunk_size(p)
    add_verbosity(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_ctx_size(args.ctx_size)
    a = read_imatrix(args.a, chunk_size=args.ctx_size)
    b = read_imatrix(args.b, chunk_size=args.ctx_size)
    try:
        cmp = compare_imatrices(a, b)
    except ImatrixError as exc:
        raise ImatrixError(f"{args.a} vs {args.b}: {exc}") from None
    sys.stdout.write(render_comparison(cmp, args.a, args.b))
    if args.parquet:
        write_comparison_parquet(cmp, args.parquet)
    if args.plot:
        from imatrix.plots import plot_comparison

        plot_comparison(cmp, args.plot, labels=("A", "B"))
    return 0
