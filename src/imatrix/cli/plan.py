"""``imatrix plan``: a per-tensor type recipe with the least predicted KLD for a size."""

from __future__ import annotations

import argparse
import logging
import os

from imatrix.cli import add_verbosity

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "plan",
        help="choose a type per tensor for a file-size budget (llama-quantize recipe)",
        description="Write a llama-quantize --tensor-type-file recipe (one anchored pattern "
        "per quantizable tensor) whose file fits the budget with the least predicted KL "
        "divergence, and RECIPE.json beside it (provenance, invocation, predictions).",
    )
    p.add_argument("-m", "--model", required=True, metavar="BASE", help="model to quantize (GGUF)")
    p.add_argument("--imatrix", required=True, metavar="FILE", help="importance matrix")
    b = p.add_mutually_exclusive_group(required=True)
    b.add_argument("--like", metavar="TYPE", help="budget: the size of the stock TYPE quant")
    b.add_argument("--target-bpw", type=float, metavar="X", help="budget: X bits per parameter")
    b.add_argument("--target-size", type=int, metavar="BYTES", help="budget: file size in bytes")
    p.add_argument("-o", "--output", required=True, metavar="RECIPE", help="recipe to write")
    p.add_argument("--types", metavar="T1,T2,...", help="candidate tensor types (default: 17)")
    p.add_argument(
        "--calibration-text",
        action="append",
        default=[],
        metavar="FILE",
        help="text for the KLD calibration (default: the imatrix's dataset files); repeatable",
    )
    p.add_argument(
        "--eval-text",
        action="append",
        default=[],
        metavar="FILE",
        help="held-out evaluation text; a calibration text with its sha256 is refused",
    )
    p.add_argument("--calibration-ctx", type=int, default=512, metavar="N", help="context size")
    p.add_argument("--calibration-chunks", type=int, default=6, metavar="N", help="chunks")
    p.add_argument("--quant-output", metavar="GGUF", help="output path in the recorded invocation")
    p.add_argument("--cache", metavar="PARQUET", help="estimate cache (default: beside RECIPE)")
    p.add_argument(
        "-j", "--jobs", type=int, default=None, help="tensors estimated in parallel (default: CPUs)"
    )
    p.add_argument("-t", "--threads", type=int, default=None, help="threads for calibration")
    p.add_argument(
        "--sample-elements",
        type=int,
        default=None,
        metavar="N",
        help="rows sampled per tensor for the error estimates, as elements (default 262144)",
    )
    add_verbosity(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from imatrix.plan import Budget, PlanOptions, plan
    from imatrix.plan_calibrate import CalibrationSettings
    from imatrix.plan_error import DEFAULT_SAMPLE_ELEMENTS
    from imatrix.plan_tensors import DEFAULT_CANDIDATES

    types = (
        tuple(t.strip() for t in args.types.split(",") if t.strip())
        if args.types
        else DEFAULT_CANDIDATES
    )
    opts = PlanOptions(
        types=types,
        calibration_texts=tuple(args.calibration_text),
        eval_texts=tuple(args.eval_text),
        quant_output=args.quant_output,
        cache=args.cache,
        jobs=max(1, args.jobs or len(os.sched_getaffinity(0))),
        sample_elements=args.sample_elements or DEFAULT_SAMPLE_ELEMENTS,
        calibration=CalibrationSettings(
            n_ctx=args.calibration_ctx, chunks=args.calibration_chunks, threads=args.threads
        ),
    )
    budget = Budget(like=args.like, target_bpw=args.target_bpw, target_size=args.target_size)
    res = plan(args.model, args.imatrix, budget, args.output, opts)
    log.info("predicted size %d bytes, predicted KLD %.5f", res.predicted_size, res.predicted_kld)
    return 0
