"""``imatrix evaluate``: PPL, KL divergence and top-token agreement of quants vs their base."""

from __future__ import annotations

import argparse
import logging

from imatrix.atomic import check_writable
from imatrix.cli import add_verbosity
from imatrix.constants import DEFAULT_EVAL_SET
from imatrix.errors import ImatrixError
from imatrix.jsonout import dumps

log = logging.getLogger(__name__)

#: columns printed as the command's output (the Parquet file has them all)
_SHOW = [
    "model",
    "type",
    "imatrix",
    "file_size",
    "bpw",
    "ppl",
    "kld_mean",
    "kld_median",
    "kld_p99",
    "kld_max",
    "same_top_p",
    "mean_dp",
]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "evaluate",
        help="perplexity, KL divergence and top-token agreement of quantized models",
        description="Evaluate QUANT models against BASE on a text, as llama-perplexity "
        "--kl-divergence does (same chunks and scored tokens), with the KL divergence "
        "over the full vocabulary and without a base-logits file.",
    )
    p.add_argument("base", metavar="BASE", help="the unquantized (reference) model")
    p.add_argument("quants", metavar="QUANT", nargs="+", help="quantized models")
    p.add_argument("-f", "--file", required=True, help="evaluation text")
    p.add_argument("-c", "--ctx-size", type=int, default=512, help="chunk size (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="evaluate at most N chunks")
    p.add_argument("-o", "--output", help="write the summary table here (Parquet)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: cores)")
    p.add_argument(
        "-ngl", "--n-gpu-layers", type=int, default=-1, help="layers to offload (default: all)"
    )
    p.add_argument(
        "--rows",
        type=int,
        default=None,
        help="logits rows decoded and compared at once (memory vs speed; default: "
        "what fits 32 MiB per buffer)",
    )
    p.add_argument(
        "--kld-method",
        choices=("exact", "llama"),
        default="exact",
        help="exact: full vocabulary in float32 (default); llama: the base's log-probabilities "
        "quantized and cut at -16 as llama-perplexity stores them",
    )
    p.add_argument("--parse-special", action="store_true", help="parse special tokens in the text")
    p.add_argument(
        "--eval-set",
        default=DEFAULT_EVAL_SET,
        metavar="NAME",
        help=f"name of the text's evaluation set in the table (default: {DEFAULT_EVAL_SET})",
    )
    p.add_argument("--json", action="store_true", help="print the table as JSON records")
    add_verbosity(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from imatrix.evaluate import evaluate, write_summary

    if args.rows is not None and args.rows <= 0:
        raise ImatrixError(f"--rows must be positive, got {args.rows}")
    if args.output:
        check_writable(args.output)  # now, not after the evaluation
    df = evaluate(
        args.base,
        args.quants,
        args.file,
        n_ctx=args.ctx_size,
        chunks=args.chunks,
        threads=args.threads,
        rows=args.rows,
        n_gpu_layers=args.n_gpu_layers,
        parse_special=args.parse_special,
        kld_method=args.kld_method,
        eval_set=args.eval_set,
    )
    if args.output:
        write_summary(df, args.output)
        log.info("wrote %s", args.output)
    if args.json:
        print(dumps(df.to_dict(orient="records"), indent=1))
    else:
        print(df[_SHOW].to_string(index=False, float_format=lambda v: f"{v:.6g}"))
    return 0
