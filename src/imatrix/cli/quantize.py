"""``imatrix quantize``: llama-quantize through the library, same flags, same bytes."""

from __future__ import annotations

import argparse
import logging

from imatrix.cli import add_verbosity
from imatrix.errors import ImatrixError
from imatrix.qtypes import QUANT_TYPES

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a GGUF model (byte-identical to llama-quantize)",
        description="Quantize BASE to OUT as TYPE through llama.cpp's llama_model_quantize, "
        "with llama-quantize's options; the output equals llama-quantize's byte for byte. "
        f"Types: {', '.join(QUANT_TYPES)}.",
    )
    p.add_argument(
        "base", metavar="BASE", help="model to quantize (GGUF; first shard of a split model)"
    )
    p.add_argument("output", metavar="OUT", help="output GGUF (written atomically)")
    p.add_argument("qtype", metavar="TYPE", help="quantization type, e.g. Q4_K_M, IQ3_XXS, F16")
    p.add_argument(
        "nthreads",
        metavar="NTHREADS",
        nargs="?",
        type=int,
        default=None,
        help="threads (as llama-quantize's optional last argument; default: all cores)",
    )
    _add_options(p)
    add_verbosity(p)
    p.set_defaults(run=run)


def _add_options(p: argparse.ArgumentParser) -> None:
    """llama-quantize's options."""
    p.add_argument("--imatrix", metavar="FILE", help="importance matrix (GGUF or legacy .dat)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all cores)")
    p.add_argument(
        "--allow-requantize",
        action="store_true",
        help="allow requantizing tensors that are already quantized",
    )
    p.add_argument(
        "--leave-output-tensor", action="store_true", help="leave output.weight un(re)quantized"
    )
    p.add_argument(
        "--pure",
        action="store_true",
        help="no k-quant mixture: quantize all tensors to the same type",
    )
    p.add_argument("--output-tensor-type", metavar="TYPE", help="ggml type for output.weight")
    p.add_argument(
        "--token-embedding-type", metavar="TYPE", help="ggml type for the token embeddings"
    )
    p.add_argument(
        "--tensor-type",
        metavar="NAME=TYPE",
        action="append",
        default=[],
        help="quantize tensors matching NAME (a regex, lower-cased) to TYPE; repeatable",
    )
    p.add_argument(
        "--tensor-type-file",
        metavar="FILE",
        help="file of NAME=TYPE entries separated by spaces or newlines",
    )
    p.add_argument(
        "--include-weights",
        metavar="NAME",
        action="append",
        default=[],
        help="use the imatrix only for tensors whose name contains NAME; repeatable",
    )
    p.add_argument(
        "--exclude-weights",
        metavar="NAME",
        action="append",
        default=[],
        help="do not use the imatrix for tensors whose name contains NAME; repeatable",
    )
    p.add_argument(
        "--override-kv",
        metavar="KEY=TYPE:VALUE",
        action="append",
        default=[],
        help="override model metadata in the output (TYPE: int, float, bool, str); repeatable",
    )
    p.add_argument(
        "--keep-split",
        action="store_true",
        help="write the output in the same shards as the input (OUT-0000i-of-0000N.gguf)",
    )


def run(args: argparse.Namespace) -> int:
    from imatrix.quantize import quantize, read_tensor_type_file

    if args.include_weights and args.exclude_weights:
        raise ImatrixError("--include-weights and --exclude-weights cannot be used together")
    threads = args.threads if args.threads is not None else args.nthreads
    if threads is not None and threads < 0:
        raise ImatrixError(f"invalid number of threads {threads}")
    tensor_types = list(args.tensor_type)
    if args.tensor_type_file:
        tensor_types += read_tensor_type_file(args.tensor_type_file)
    out = quantize(
        args.base,
        args.output,
        args.qtype,
        imatrix=args.imatrix,
        threads=threads,
        allow_requantize=args.allow_requantize,
        leave_output_tensor=args.leave_output_tensor,
        pure=args.pure,
        output_tensor_type=args.output_tensor_type,
        token_embedding_type=args.token_embedding_type,
        tensor_types=tensor_types,
        include_weights=args.include_weights,
        exclude_weights=args.exclude_weights,
        override_kv=args.override_kv,
        keep_split=args.keep_split,
    )
    log.info("wrote %s", out)
    return 0
