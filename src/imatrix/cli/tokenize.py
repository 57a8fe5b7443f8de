"""``imatrix tokenize``: calibration text -> int32 tokens ``.npy`` + ``.json`` record.

The tokens are exactly those llama-imatrix makes of its ``-f`` file, so
``imatrix collect --tokens`` (and the workflow) can reuse them across shards.
"""

from __future__ import annotations

import argparse
import logging

from imatrix.cli import add_verbosity

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("tokenize", help="tokenize calibration text as llama-imatrix does")
    p.add_argument(
        "-m", "--model", required=True, help="model GGUF (only its vocabulary is loaded)"
    )
    p.add_argument("-f", "--file", required=True, help="calibration text file")
    p.add_argument(
        "-o", "--output", required=True, help="tokens .npy (a .json record is written beside it)"
    )
    p.add_argument("--parse-special", action="store_true", help="parse special tokens in the text")
    add_verbosity(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from imatrix.tokenize import tokenize_file

    rec = tokenize_file(args.model, args.file, args.output, parse_special=args.parse_special)
    log.info("%s: %d tokens -> %s", args.file, rec["n_tokens"], args.output)
    return 0
