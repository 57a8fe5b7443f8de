"""``imatrix check``: is an imatrix healthy enough to quantize with?

Exit code 0 when no finding is at level ``fail`` (warnings allowed), 1 otherwise; the
report goes to stdout.
"""

from __future__ import annotations

import argparse
import sys

from imatrix.cli import add_dat_chunk_size, add_verbosity, check_ctx_size
from imatrix.coverage import DEFAULT_MIN_EXPERT_TOKENS
from imatrix.errors import ImatrixError
from imatrix.formats import read_imatrix
from imatrix.health import (
    CHECKS,
    DEFAULT_MIN_TOKENS,
    check_imatrix,
    expected_from_model,
    format_report,
    min_expert_tokens_value,
)


def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "check",
        help="health check: non-finite values, dead experts, zero channels, few tokens",
        description="Checks: "
        + ", ".join(f"{k} ({v})" for k, v in CHECKS.items())
        + ". Exit code 1 when any finding is at level fail.",
    )
    p.add_argument("input", metavar="IN", help="imatrix file (GGUF or .dat)")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument(
        "--fail-on",
        action="append",
        default=[],
        metavar="CHECKS",
        help="comma-separated checks to treat as failures ('warn' = every warning)",
    )
    p.add_argument(
        "--warn-on",
        action="append",
        default=[],
        metavar="CHECKS",
        help="comma-separated checks to report as warnings only",
    )
    p.add_argument(
        "--min-tokens",
        type=int,
        default=DEFAULT_MIN_TOKENS,
        help=f"tokens an expert (or tensor) needs (default {DEFAULT_MIN_TOKENS})",
    )
    p.add_argument(
        "--min-expert-tokens",
        type=int,
        default=DEFAULT_MIN_EXPERT_TOKENS,
        metavar="N",
        help="report MoE experts routed fewer than N tokens as expert_coverage, with what "
        f"llama-quantize does with them (default {DEFAULT_MIN_EXPERT_TOKENS}: none)",
    )
    p.add_argument("-m", "--model", help="model GGUF: also report weights missing from the imatrix")
    add_dat_chunk_size(p)
    add_verbosity(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_ctx_size(args.ctx_size)
    if args.min_tokens < 0:
        raise ImatrixError(f"--min-tokens must not be negative, got {args.min_tokens}")
    min_expert_tokens = min_expert_tokens_value(args.min_expert_tokens, "--min-expert-tokens")
    fail_on = [n for t in args.fail_on for n in _names(t)]
    warn_on = [n for t in args.warn_on for n in _names(t)]
    data = read_imatrix(args.input, chunk_size=args.ctx_size, strict=False)
    expected = expected_from_model(args.model) if args.model else None
    try:
        report = check_imatrix(
            data,
            source=args.input,
            min_tokens=args.min_tokens,
            fail_on=fail_on,
            warn_on=warn_on,
            expected=expected,
            min_expert_tokens=min_expert_tokens,
        )
    except ValueError as exc:
        raise ImatrixError(f"--fail-on/--warn-on: {exc}") from None
    sys.stdout.write(format_report(report, as_json=args.json))
    return 1 if report.failed else 0
