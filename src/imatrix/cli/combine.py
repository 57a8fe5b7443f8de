"""``imatrix combine``: add imatrices (shards, datasets) into one file."""

from __future__ import annotations

import argparse
import logging
from functools import partial

from imatrix.cli import add_verbosity, check_ctx_size
from imatrix.errors import ImatrixError
from imatrix.formats import FORMATS, read_imatrix, write_imatrix
from imatrix.model import combine

log = logging.getLogger(__name__)


def parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError as exc:
        raise ImatrixError(f"--weights: not a comma-separated list of numbers: '{text}'") from exc


def add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, help="output file")
    p.add_argument("--output-format", choices=FORMATS, default="gguf", help="gguf (default) or dat")
    p.add_argument(
        "-c",
        "--ctx-size",
        type=int,
        default=None,
        help="chunk size: scales legacy .dat inputs and sets the output's chunk size "
        "(default: from the first GGUF input, else 512, as llama-imatrix's -c)",
    )
    p.add_argument(
        "--compat",
        action="store_true",
        help="write exactly llama-imatrix's GGUF layout (no in_sum tensors, no provenance)",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("combine", help="combine imatrix files (sums and counts add)")
    p.add_argument("inputs", nargs="+", metavar="IN", help="imatrix files (GGUF or .dat)")
    add_output_options(p)
    p.add_argument(
        "--weights", help="comma-separated weights, one per input (scale sums and counts)"
    )
    p.add_argument(
        "--force", action="store_true", help="combine even if inputs come from different models"
    )
    add_verbosity(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_ctx_size(args.ctx_size)
    weights = parse_weights(args.weights)
    # loaders, not data: the combine reads one input at a time
    items = [partial(read_imatrix, p, chunk_size=args.ctx_size) for p in args.inputs]
    out = combine(
        items, weights=weights, chunk_size=args.ctx_size, force=args.force, sources=args.inputs
    )
    write_imatrix(out, args.output, output_format=args.output_format, compat=args.compat)
    return 0
