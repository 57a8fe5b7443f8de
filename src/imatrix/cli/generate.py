"""``imatrix generate``: the model writes its own calibration text from prompts.

The output is a JSONL dataset (one record per prompt, its ``text`` field the prompt and
continuation) that ``tokenize`` and the workflow read like any other; the sampler and
what keeps it reproducible are described in :mod:`imatrix.generate`.
"""

from __future__ import annotations

import argparse
import logging

from imatrix.cli import add_verbosity

log = logging.getLogger(__name__)


def _positive_int(value: str) -> int:
    n = int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {n}")
    return n


def _temperature(value: str) -> float:
    t = float(value)
    if not t >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return t


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "generate",
        help="generate calibration text with the model itself",
        description="Continue every prompt with up to N tokens sampled from the model "
        "(softmax at TEMPERATURE; 0 is greedy) on the CPU: the same model, seed, "
        "temperature and thread count give the same text on the same build.",
    )
    p.add_argument("-m", "--model", required=True, help="model GGUF")
    p.add_argument(
        "--prompts", required=True, help="prompts: text (one per line) or JSONL ('prompt' field)"
    )
    p.add_argument("-n", "--n-predict", type=_positive_int, required=True, help="tokens per prompt")
    p.add_argument("--seed", type=int, required=True, help="random seed")
    p.add_argument(
        "--temperature", type=_temperature, default=1.0, help="softmax temperature (default 1)"
    )
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="never end a text early: mask the end-of-generation tokens (as llama.cpp)",
    )
    p.add_argument("-t", "--threads", type=_positive_int, default=None, help="threads")
    p.add_argument("-o", "--output", required=True, help="JSONL dataset to write")
    add_verbosity(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from imatrix.atomic import check_writable
    from imatrix.generate import GenerateSettings, generate_file

    check_writable(args.output)
    settings = GenerateSettings(
        tokens=args.n_predict,
        seed=args.seed,
        temperature=args.temperature,
        threads=args.threads,
        ignore_eos=args.ignore_eos,
    )
    generate_file(args.model, args.prompts, args.output, settings)
    return 0
