"""``imatrix <subcommand>``: the command-line face of the library.

Why a package of one module per subcommand: each subcommand owns its flags and
stays small; adding one is a new module plus a line in ``_SUBCOMMANDS``. Every
subcommand's ``run`` calls library functions only; this module turns
:class:`~imatrix.errors.ImatrixError` into one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import TextIO

from imatrix import __version__
from imatrix.errors import ImatrixError

log = logging.getLogger("imatrix")

#: modules under imatrix.cli, each with ``register(subparsers)``
_SUBCOMMANDS = (
    "combine",
    "convert",
    "info",
    "stats",
    "check",
    "compare",
    "quantize",
    "evaluate",
    "collect",
    "tokenize",
    "plan",
    "generate",
)


def add_verbosity(p: argparse.ArgumentParser) -> None:
    """The ``-v/-q`` pair every subcommand takes."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    g.add_argument("-q", "--quiet", action="count", default=0, help="less log output")


def add_dat_chunk_size(p: argparse.ArgumentParser) -> None:
    """``-c/--ctx-size`` of the subcommands that only read imatrices: the chunk size
    of ``.dat`` inputs (they do not record it), as llama.cpp's ``-c``."""
    p.add_argument(
        "-c", "--ctx-size", type=int, default=None, help="chunk size for .dat inputs (default 512)"
    )


def check_ctx_size(ctx_size: int | None) -> None:
    """Refuse a ``-c/--ctx-size`` that is given but not positive (the chunk size of
    ``.dat`` inputs, which llama.cpp would divide by)."""
    if ctx_size is not None and ctx_size <= 0:
        raise ImatrixError(f"-c/--ctx-size must be positive, got {ctx_size}")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is now (tests and wrappers swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def setup_logging(verbose: int = 0, quiet: int = 0) -> None:
    """Log to stderr. INFO by default (long jobs should say what they do), -v DEBUG,
    -q WARNING, -qq ERROR."""
    level = logging.INFO - 10 * verbose + 10 * quiet
    level = max(logging.DEBUG, min(logging.CRITICAL, level))
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _StderrHandler):
            root.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname).1s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with ``only`` the parser of that one subcommand (its module
    alone is imported: the others may pull in pandas or matplotlib, seconds of start-up
    that e.g. a quantization benchmark against llama-quantize would count)."""
    parser = argparse.ArgumentParser(
        prog="imatrix",
        description="Compute, combine, inspect and use importance matrices for GGUF models.",
    )
    parser.add_argument("--version", action="version", version=f"imatrix-pipeline {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<subcommand>", required=True)
    for name in _SUBCOMMANDS:
        if only is None or name == only:
            importlib.import_module(f"imatrix.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv and argv[0] in _SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if getattr(args, "setup_logging", True):
        setup_logging(getattr(args, "verbose", 0), getattr(args, "quiet", 0))
    try:
        rc = args.run(args)
    except ImatrixError as exc:
        msg = " ".join(str(exc).split())
        print(f"imatrix {args.command}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"imatrix {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
