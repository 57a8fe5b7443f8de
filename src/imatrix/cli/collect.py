"""``imatrix collect``: a drop-in for ``llama-imatrix`` (same flags, same meaning, same files).

Differences, all deliberate: ``--tokens`` takes a tokens file from ``imatrix
tokenize`` instead of ``-f``; ``--compat`` writes llama-imatrix's GGUF layout only
(the default adds activation sums and provenance); the output is written once at the
end and intermediate saves go to ``<output>.checkpoint`` (``--resume`` continues from
it) instead of rewriting the output; ``--in-file`` without ``-f`` needs no ``-m``.
Ours only: ``--until-converged EPS[:PATIENCE]`` stops once the convergence record
(:mod:`imatrix.convergence`, kept in every output but ``--compat``) says the imatrix
no longer changes; without it every chunk is collected, as llama-imatrix does.

Signals: SIGTERM (what SLURM sends before a preemption's or time limit's SIGKILL)
finishes the chunks being decoded, writes ``<output>.checkpoint`` and exits with
status 143, so that Snakemake or a requeued job reruns it and ``--resume`` continues
to the same bytes. SIGINT (Ctrl-C) stops at once with status 130, keeping the last
periodic checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

import numpy as np

from imatrix.atomic import check_writable
from imatrix.cli import add_verbosity
from imatrix.constants import DEFAULT_OUTPUT
from imatrix.convergence import (
    DEFAULT_PATIENCE,
    MAX_RECORD_INTERVAL,
    StopRule,
    parse_stop_rule,
)
from imatrix.errors import ImatrixError
from imatrix.formats import (
    FORMAT_DAT,
    FORMAT_GGUF,
    FORMATS,
    read_imatrix,
    write_imatrix,
)
from imatrix.model import ImatrixData, Provenance, combine

if TYPE_CHECKING:  # the collector loads llama.cpp: only imported when collecting
    from imatrix.collect import CollectResult, CollectSettings

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "collect",
        help="compute an importance matrix (drop-in for llama-imatrix)",
        description="Compute an importance matrix for a model over calibration text, "
        "with llama-imatrix's flags and results.",
    )
    _add_files(p)
    _add_collection(p)
    _add_run(p)
    add_verbosity(p)
    p.set_defaults(run=run)


def _add_files(p: argparse.ArgumentParser) -> None:
    """Model, text and output."""
    p.add_argument("-m", "--model", help="model GGUF (not needed to combine --in-file inputs)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("-f", "--file", help="calibration text file")
    src.add_argument("--tokens", help="tokens .npy from 'imatrix tokenize' (instead of -f)")
    p.add_argument(
        "-o",
        "--output-file",
        "--output",
        dest="output",
        default=DEFAULT_OUTPUT,
        help=f"output file (default: {DEFAULT_OUTPUT})",
    )
    p.add_argument("--output-format", choices=FORMATS, default=None, help="gguf (default) or dat")
    p.add_argument(
        "--compat",
        action="store_true",
        help="write exactly llama-imatrix's GGUF layout (no in_sum tensors, no provenance)",
    )


def _add_collection(p: argparse.ArgumentParser) -> None:
    """What is collected and saved."""
    ppl = p.add_mutually_exclusive_group()
    ppl.add_argument("--no-ppl", dest="ppl", action="store_false", help="do not compute perplexity")
    ppl.add_argument("--ppl", dest="ppl", action="store_true", help="compute perplexity (default)")
    p.set_defaults(ppl=True)
    p.add_argument("--process-output", action="store_true", help="collect data for output.weight")
    p.add_argument(
        "--chunk",
        "--from-chunk",
        dest="chunk",
        type=int,
        default=0,
        help="start processing the input from chunk N (default: 0)",
    )
    p.add_argument(
        "--chunks", type=int, default=-1, help="max number of chunks to process (-1: all)"
    )
    p.add_argument(
        "-ofreq",
        "--output-frequency",
        dest="output_frequency",
        type=int,
        default=10,
        help="write the checkpoint every N chunks (default: 10; 0: never)",
    )
    p.add_argument(
        "--save-frequency",
        type=int,
        default=0,
        help="save a copy <output>.at_<n> every N chunks (default: 0 = never)",
    )
    p.add_argument(
        "--in-file",
        action="append",
        default=[],
        metavar="FILE",
        help="imatrix to load and combine (repeatable, or comma-separated)",
    )
    p.add_argument("--parse-special", action="store_true", help="parse special tokens in the text")
    p.add_argument(
        "--until-converged",
        type=_stop_rule,
        default=None,
        metavar="EPS[:PATIENCE]",
        help="ours: stop once the convergence record's largest 1-cos change stays below EPS "
        f"for PATIENCE consecutive records (default PATIENCE {DEFAULT_PATIENCE}; a record "
        f"every min(-ofreq, {MAX_RECORD_INTERVAL}) chunks); default: every chunk",
    )
    p.add_argument(
        "--show-statistics", action="store_true", help="show statistics of one --in-file and exit"
    )


def _add_run(p: argparse.ArgumentParser) -> None:
    """How it runs (llama.cpp's context flags) and reports."""
    p.add_argument(
        "-c", "--ctx-size", type=int, default=512, help="chunk size in tokens (default: 512)"
    )
    p.add_argument(
        "-b", "--batch-size", type=int, default=2048, help="logical batch size (default: 2048)"
    )
    p.add_argument(
        "-ub", "--ubatch-size", type=int, default=512, help="physical batch size (default: 512)"
    )
    p.add_argument(
        "-t", "--threads", type=int, default=-1, help="threads (default: physical cores)"
    )
    p.add_argument(
        "-ngl",
        "--gpu-layers",
        "--n-gpu-layers",
        dest="n_gpu_layers",
        type=int,
        default=-1,
        help="layers to offload to the GPU (default: -1 = all)",
    )
    p.add_argument(
        "--seed", type=int, default=None, help="accepted for compatibility (no sampling)"
    )
    p.add_argument(
        "-lv",
        "--verbosity",
        type=int,
        default=1,
        help="0: only perplexity; 1: report saves (default); 2: report every tensor collected",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from <output>.checkpoint if it exists"
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)"
    )


def _stop_rule(text: str) -> StopRule:
    try:
        return parse_stop_rule(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _in_files(values: list[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        out.extend(x for x in v.split(",") if x)
    return out


def _show_statistics(paths: list[str], n_ctx: int) -> int:
    if len(paths) != 1:
        raise ImatrixError(
            "a single imatrix file (--in-file) is required to compute tensor statistics"
        )
    try:
        from imatrix.stats import render_statistics
    except ImportError as exc:
        raise ImatrixError(
            "--show-statistics needs imatrix.stats.render_statistics, which is not available "
            f"in this installation ({exc})"
        ) from exc
    data = read_imatrix(paths[0], chunk_size=n_ctx)
    sys.stdout.write(render_statistics(data, source=paths[0], legacy=None))
    sys.stdout.flush()
    return 0


def run(args: argparse.Namespace) -> int:
    # -lv 0: nothing but perplexity (and warnings); otherwise the -v/-q level applies
    logging.getLogger("imatrix").setLevel(
        logging.WARNING if args.verbosity <= 0 else logging.NOTSET
    )
    in_files = _in_files(args.in_file)
    if args.show_statistics:
        return _show_statistics(in_files, args.ctx_size if args.ctx_size > 0 else 512)
    n_ctx = args.ctx_size
    if n_ctx <= 0:
        raise ImatrixError("imatrix collection requires -c/--ctx-size > 0")
    fmt = args.output_format or FORMAT_GGUF
    if args.output_format is None and not str(args.output).endswith(".gguf"):
        log.warning(
            "saving the imatrix in GGUF format with a suffix other than .gguf "
            "(use --output-format dat for the legacy format)"
        )
    if fmt == FORMAT_DAT and args.compat:
        log.warning("--compat has no effect with --output-format dat")
    check_writable(args.output)  # before hashing and tokenizing, not after hours of work

    loaded: ImatrixData | None = None
    if in_files:
        items = []
        for path in in_files:
            log.info("loading imatrix from '%s'", path)
            items.append(read_imatrix(path, chunk_size=n_ctx))
        loaded = combine(items, chunk_size=n_ctx, force=True, sources=in_files)

    if not args.file and not args.tokens:
        if loaded is None:
            raise ImatrixError("no text (-f/--tokens) and no imatrix (--in-file) to combine")
        log.info("no text given: combining precomputed matrices only")
        write_imatrix(loaded, args.output, output_format=fmt, compat=args.compat)
        return 0
    if not args.model:
        raise ImatrixError("-m/--model is required to collect an imatrix")
    return _collect(args, loaded, fmt, n_ctx)


def _collect(args: argparse.Namespace, loaded: ImatrixData | None, fmt: str, n_ctx: int) -> int:
    from imatrix.collect import Terminated, collect

    tokens, prov, dataset = _tokens_and_provenance(args)
    log.info("%d tokens", tokens.size)
    first, n_chunk = _chunk_range(args, tokens.size, n_ctx)
    printed = [False]

    def on_chunk(k: int, running: float | None) -> None:
        if running is not None:
            sys.stdout.write(f"[{k - first + 1}]{running:.4f},")
            sys.stdout.flush()
            printed[0] = True

    try:
        result = collect(
            args.model,
            tokens,
            args.output,
            _settings(args, first, n_chunk, n_ctx, fmt),
            dataset=dataset,
            provenance=prov,
            in_data=loaded,
            on_chunk=on_chunk,
        )
    except Terminated as stop:  # the collector has said where it stopped
        if printed[0]:
            sys.stdout.write("\n")
            sys.stdout.flush()
        return int(stop.code or 1)
    if printed[0]:
        sys.stdout.write("\n")
    _report(result)
    return 0


def _tokens_and_provenance(args: argparse.Namespace) -> tuple[np.ndarray, Provenance, str]:
    """The tokens of ``-f`` (tokenized as llama-imatrix does) or ``--tokens``, their
    provenance (the model is hashed) and the dataset name to record."""
    from dataclasses import replace

    from imatrix.collect.plan import provenance_for
    from imatrix.hashing import sha256_file
    from imatrix.llama_api import load_model
    from imatrix.tokenize import (
        load_tokens,
        read_text,
        tokenize_text,
        tokenizer_json,
        tokenizer_settings,
    )

    log.info("hashing %s for provenance", args.model)
    model_sha = sha256_file(args.model)
    if args.file:
        data = read_text(args.file)
        with load_model(args.model, vocab_only=True) as vm:
            tokens = tokenize_text(vm, data, parse_special=args.parse_special)
            tok_settings = tokenizer_json(tokenizer_settings(vm, parse_special=args.parse_special))
        prov = Provenance(
            model_sha256=model_sha, dataset_sha256=[sha256_file(args.file)], tokenizer=tok_settings
        )
        return np.asarray(tokens, dtype=np.int32), prov, args.file
    tokens, meta = load_tokens(args.tokens)
    meta = meta or {}
    if meta.get("model_sha256") and meta["model_sha256"] != model_sha:
        raise ImatrixError(
            f"{args.tokens}: was tokenized with another model (sha256 {meta['model_sha256'][:12]}, "
            f"{args.model} has {model_sha[:12]})"
        )
    if args.parse_special and meta.get("parse_special") is False:
        log.warning("--parse-special has no effect on --tokens (tokenized without it)")
    prov = replace(provenance_for(None, meta), model_sha256=model_sha)
    return np.asarray(tokens, dtype=np.int32), prov, str(meta.get("text") or args.tokens)


def _chunk_range(args: argparse.Namespace, n_tokens: int, n_ctx: int) -> tuple[int, int]:
    """``(first chunk, number of chunks)`` with llama-imatrix's checks on the whole
    file's tokens (``--chunk`` leaves at least two chunks; ``--chunks`` caps)."""
    first = args.chunk
    source = args.file or args.tokens
    if first < 0:
        raise ImatrixError(f"--chunk must not be negative, got {first}")
    if first > 0:
        if (first + 2) * n_ctx >= n_tokens:
            raise ImatrixError(
                f"{source}: there will be not enough tokens left after "
                f"removing {first} chunks ({n_tokens} tokens, --chunk {first}, -c {n_ctx})"
            )
        log.info("removing initial %d chunks (%d tokens)", first, first * n_ctx)
    remaining = n_tokens - first * n_ctx
    if remaining < 2 * n_ctx:
        raise ImatrixError(
            f"{source}: you need at least {2 * n_ctx} tokens for a context "
            f"of {n_ctx} tokens; the data tokenizes to only {remaining} tokens"
        )
    n_chunk_max = remaining // n_ctx
    n_chunk = n_chunk_max if args.chunks < 0 else min(args.chunks, n_chunk_max)
    if n_chunk <= 0:
        raise ImatrixError("no chunks to process (--chunks 0)")
    return first, n_chunk


def _settings(
    args: argparse.Namespace, first: int, n_chunk: int, n_ctx: int, fmt: str
) -> CollectSettings:
    from imatrix.collect import CollectSettings

    return CollectSettings(
        first_chunk=first,
        last_chunk=first + n_chunk,
        n_ctx=n_ctx,
        n_batch=args.batch_size,
        n_ubatch=args.ubatch_size,
        threads=args.threads if args.threads > 0 else None,
        n_gpu_layers=args.n_gpu_layers,
        process_output=args.process_output,
        compute_ppl=args.ppl,
        output_frequency=args.output_frequency,
        save_frequency=args.save_frequency,
        output_format=fmt,
        compat=args.compat,
        resume=args.resume,
        progress=False if args.no_progress else None,
        verbosity=args.verbosity,
        until_converged=args.until_converged,
    )


def _report(result: CollectResult) -> None:
    """llama-imatrix's final perplexity line on stdout, our throughput in the log."""
    p = result.perplexity
    if p is not None and p.ppl is not None:
        err = p.error
        if err is None:
            sys.stdout.write("Unexpected negative standard deviation of log(prob)\n")
        else:
            sys.stdout.write(f"Final estimate: PPL = {p.ppl:.4f} +/- {err:.5f}\n")
    sys.stdout.flush()
    conv = result.convergence
    if conv is not None and conv.stopped_at is not None:
        log.info("converged: stopped after %d chunks (chunk %d)", conv.chunks_used, conv.stopped_at)
    rate = result.n_tokens / result.seconds if result.seconds > 0 else float("nan")
    log.info(
        "%d tokens in %.2f s (%.1f tokens/s)%s",
        result.n_tokens,
        result.seconds,
        rate,
        ", graphs cut after the last needed tensor" if result.stopped_early else "",
    )
