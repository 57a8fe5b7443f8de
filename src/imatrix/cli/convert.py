"""``imatrix convert``: GGUF <-> legacy .dat, or our extended GGUF to llama-imatrix's layout."""

from __future__ import annotations

import argparse

from imatrix.cli import add_verbosity, check_ctx_size
from imatrix.cli.combine import add_output_options
from imatrix.convert import convert_imatrix


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("convert", help="convert an imatrix between formats")
    p.add_argument("input", metavar="IN", help="imatrix file (GGUF or .dat)")
    add_output_options(p)
    add_verbosity(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_ctx_size(args.ctx_size)
    convert_imatrix(
        args.input,
        args.output,
        output_format=args.output_format,
        compat=args.compat,
        chunk_size=args.ctx_size,
    )
    return 0
