#!/usr/bin/env python
"""Benchmark: ``imatrix collect`` against llama.cpp's ``llama-imatrix``, side by side.

Runs both on the same model, text, chunks and threads, with and without perplexity,
and four bounds through the same llama.cpp on the same batches:

- a plain forward pass (no eval callback) with no logits, and one with logits for
  every token;
- our chunk loop with an eval callback that asks for the same tensors and reads and
  sums nothing: once cut after the last needed tensor (as ours without perplexity),
  once with logits for every token (as ours with perplexity, which needs them).

The do-nothing rows separate what the scheduler costs (graph splits at observed
tensors, callback round-trips, thread hand-offs) from what our arithmetic costs. The
issue's targets: without perplexity at least 2.5x llama-imatrix and at most 1.10x the
forward pass without logits; with perplexity at most 1.05x the do-nothing callback
with all logits, and the whole process at least as fast as llama-imatrix's.

"Collection" times cover the chunk loop: for llama-imatrix from its "computing over"
log line to the end of the process (its final save and exit are in it), for ours from
the probe to the last decode. Every run is a fresh process; "process s" is its whole
wall time (interpreter start, imports and model load included).

Default model: the demo gemma-3-270m (from the PyPI chunk packages) converted to F16
with llama-quantize, cached under ~/.cache/imatrix-pipeline/bench. Default text: the
repository's calibration prose, repeated until it fills the chunks. The machine
should be otherwise idle; ``--repeat N`` runs N interleaved rounds and keeps each
measurement's median, printed with the load average seen when that run started.

    python benchmarks/collect.py [--model M.gguf] [--text T.txt] [--chunks 16] [-c 512] [-t 2]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imatrix.reference import pinned_tools_dir

ROOT = Path(__file__).resolve().parents[1]
CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imatrix-pipeline" / "bench"
)

log = logging.getLogger("bench")


@dataclass
class Timing:
    name: str
    seconds: float  # collection loop (or forward pass)
    wall: float | None  # whole run incl. model load
    tokens: int
    #: ours only: seconds summing activations (in the eval callback) and computing perplexity
    callback: float | None = None
    perplexity: float | None = None
    #: the one-minute load average when the run started
    load: float = float("nan")

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def default_model(bin_dir: Path) -> Path:
    from imatrix.demo import DEMO_MODEL_NAME, assemble_demo_model

    CACHE.mkdir(parents=True, exist_ok=True)
    f16 = CACHE / "gemma-3-270m-f16.gguf"
    if f16.is_file():
        return f16
    q = assemble_demo_model(CACHE / DEMO_MODEL_NAME)
    tmp = f16.with_suffix(".tmp.gguf")
    log.info("converting %s to F16 with llama-quantize", q)
    subprocess.run(
        [str(bin_dir / "llama-quantize"), "--allow-requantize", str(q), str(tmp), "F16"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=3600,
    )
    tmp.replace(f16)
    return f16


def default_text(model: Path, n_tokens: int, workdir: Path) -> Path:
    """The repository's calibration prose, repeated until it holds ``n_tokens`` tokens."""
    from imatrix.llama_api import load_model
    from imatrix.tokenize import tokenize_text

    src = sorted((ROOT / "data" / "calibration").glob("*.txt"))
    base = "\n\n".join(p.read_text(encoding="utf-8") for p in src) if src else _FALLBACK
    with load_model(model, vocab_only=True) as m:
        per = tokenize_text(m, base.encode()).size
    reps = n_tokens // max(per, 1) + 2
    out = workdir / "bench-text.txt"
    out.write_text("\n\n".join([base] * reps), encoding="utf-8")
    return out


_FALLBACK = (
    "The old house stood at the end of the long road, where the water of the river met the "
    "light of the morning. Many people had lived there over the years, and each of them had "
    "left something behind: a chair by the window, a small garden of herbs, a map of the world. "
) * 20


_TS = re.compile(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) I compute_imatrix: computing over", re.M)


def run_llama(
    bin_dir: Path, model: Path, text: Path, args: argparse.Namespace, ppl: bool, out: Path
) -> Timing:
    cmd = [
        str(bin_dir / "llama-imatrix"),
        "-m",
        str(model),
        "-f",
        str(text),
        "-o",
        str(out),
        "-c",
        str(args.ctx_size),
        "-b",
        str(args.batch_size),
        "--chunks",
        str(args.chunks),
        "-t",
        str(args.threads),
        "-ngl",
        str(args.ngl),
    ]
    if not ppl:
        cmd.append("--no-ppl")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"llama-imatrix failed:\n{proc.stderr[-3000:]}")
    m = _TS.search(proc.stderr)
    start = (
        int(m.group(1)) * 60 + int(m.group(2)) + int(m.group(3)) / 1e3 + int(m.group(4)) / 1e6
        if m
        else 0.0
    )
    return Timing(
        "llama-imatrix" + ("" if ppl else " --no-ppl"),
        wall - start,
        wall,
        args.chunks * args.ctx_size,
    )


def _settings(args: argparse.Namespace, ppl: bool, stop_early: bool | None = None) -> Any:
    from imatrix.collect import CollectSettings

    return CollectSettings(
        last_chunk=args.chunks,
        n_ctx=args.ctx_size,
        n_batch=args.batch_size,
        threads=args.threads,
        n_gpu_layers=args.ngl,
        compute_ppl=ppl,
        stop_early=stop_early,
        progress=False,
    )


def _run_worker(kind: str, model: Path, tokens: Path, args: argparse.Namespace) -> Timing:
    """One measurement of ours in a fresh process (as llama-imatrix runs): ``wall`` is
    the whole process, interpreter start and imports included."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--model", str(model)]
    cmd += ["--tokens", str(tokens), "--chunks", str(args.chunks), "-c", str(args.ctx_size)]
    cmd += ["-b", str(args.batch_size), "-t", str(args.threads), "-ngl", str(args.ngl)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"benchmark worker {kind} failed:\n{proc.stderr[-3000:]}")
    t = Timing(**json.loads(proc.stdout.strip().splitlines()[-1]))
    t.wall = wall
    return t


def worker(kind: str, model: Path, tokens: np.ndarray, args: argparse.Namespace) -> Timing:
    """Run measurement ``kind`` in this process (see :data:`WORKERS`)."""
    if kind in ("forward", "forward-logits"):
        return run_forward(model, tokens, args, kind == "forward-logits")
    from imatrix.collect import collect

    if kind in ("ours", "ours-ppl"):
        out = Path(args.tokens).with_name(f"{kind}.gguf")  # written, as llama-imatrix does
        r = collect(model, tokens, out, _settings(args, kind == "ours-ppl"), dataset="bench")
        return Timing(
            WORKERS[kind],
            r.compute_seconds,
            None,
            r.n_tokens,
            callback=r.collect_seconds,
            perplexity=r.ppl_seconds,
        )
    stop_early = None if kind == "idle-cut" else False
    seconds, n_tokens = run_idle(model, tokens, _settings(args, False, stop_early))
    return Timing(WORKERS[kind], seconds, None, n_tokens)


def run_idle(model: Path, tokens: np.ndarray, settings: Any) -> tuple[float, int]:
    """The collector's loop (probe, graph cut, the same observed tensors, all logits
    unless cut) with an eval callback that reads and sums nothing: the bound our
    arithmetic is measured against."""
    from imatrix.collect import Collector
    from imatrix.collect.checkpoint import start_point
    from imatrix.collect.job import prepare_job
    from imatrix.collect.loop import run_chunks
    from imatrix.collect.termination import StopRequest

    class _Idle(Collector):
        def _accumulate(self, t: Any, name: str, src0: Any, src1: Any) -> int:
            return self._rows(t, src0, src1)

    job = prepare_job(model, tokens, None, settings, dataset=None, provenance=None, base=None)
    start = start_point(
        None, job.signature, resume=False, first=job.plan.first, base=None, compute_ppl=False
    )
    _, stats = run_chunks(job, start, None, StopRequest(), collector_type=_Idle)
    return stats.compute_seconds, stats.n_tokens


def run_forward(model: Path, tokens: np.ndarray, args: argparse.Namespace, logits: bool) -> Timing:
    """The same batches as the collectors decode, with no eval callback."""
    from imatrix.collect import plan_batches
    from imatrix.llama_api import Batch, Context, load_model

    n_ctx = args.ctx_size
    n_seq, n_kv, n_batch = plan_batches(n_ctx, args.batch_size)
    with (
        load_model(model, n_gpu_layers=args.ngl) as m,
        Context(
            m, n_ctx=n_kv, n_batch=n_batch, n_ubatch=512, n_seq_max=n_seq, n_threads=args.threads
        ) as ctx,
    ):
        batch = Batch(n_batch)
        t0 = time.perf_counter()
        for g0 in range(0, args.chunks, n_seq):
            ns = min(n_seq, args.chunks - g0)
            ctx.clear()
            for b0 in range(0, n_ctx, n_batch):
                bs = min(n_ctx - b0, n_batch)
                toks = np.concatenate(
                    [tokens[(g0 + s) * n_ctx + b0 : (g0 + s) * n_ctx + b0 + bs] for s in range(ns)]
                )
                pos = np.tile(np.arange(b0, b0 + bs), ns)
                ctx.decode_tokens(batch, toks, pos, np.repeat(np.arange(ns), bs), logits)
        ctx.synchronize()
        dt = time.perf_counter() - t0
    return Timing(
        "forward pass, " + ("logits for every token" if logits else "no logits"),
        dt,
        None,
        args.chunks * n_ctx,
    )


#: measurements of ours, each run in a fresh process: kind -> row name
WORKERS = {
    "ours": "imatrix collect --no-ppl",
    "ours-ppl": "imatrix collect",
    "idle-cut": "do-nothing callback, cut after the last needed tensor",
    "idle-logits": "do-nothing callback, logits for every token",
    "forward": "forward pass, no logits",
    "forward-logits": "forward pass, logits for every token",
}


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", help="GGUF model (default: demo gemma-3-270m converted to F16)")
    ap.add_argument("--text", help="calibration text (default: repository prose, repeated)")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("-c", "--ctx-size", type=int, default=512)
    ap.add_argument("-b", "--batch-size", type=int, default=2048)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-ngl", type=int, default=0, help="GPU layers for both tools (default 0)")
    ap.add_argument("--llama-bin", help="directory with llama-imatrix (default: build script)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; the median of each is kept")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds allowed per run")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    return ap.parse_args()


def _measure(
    jobs: dict[str, Callable[[], Timing]], repeat: int
) -> tuple[dict[str, Timing], list[dict[str, Timing]]]:
    """Whole rounds, one after the other (a burst of load on a shared machine then hits
    one round of every measurement rather than all repeats of one). Returns the median
    run of each measurement, with the load average seen when it started, and every
    round (ratios within one round share the machine's state)."""
    rounds: list[dict[str, Timing]] = []
    for r in range(repeat):
        rounds.append({})
        for key, job in jobs.items():
            load = os.getloadavg()[0]
            t = job()
            t.load = load
            log.info("round %d: %s %.2f s (load average %.1f)", r + 1, t.name, t.seconds, load)
            rounds[-1][key] = t
    mid = (repeat - 1) // 2
    medians = {k: sorted((rd[k] for rd in rounds), key=lambda t: t.seconds)[mid] for k in jobs}
    return medians, rounds


def main() -> None:
    args = _parse()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    log.setLevel(logging.INFO)
    if args.worker:
        toks = np.load(args.tokens)
        print(json.dumps(asdict(worker(args.worker, Path(args.model), toks, args))))
        return

    from imatrix.llama_api import load_model
    from imatrix.tokenize import read_text, tokenize_text

    bins = pinned_tools_dir(args.llama_bin)
    model = Path(args.model) if args.model else default_model(bins)
    with tempfile.TemporaryDirectory(prefix="bench-collect-") as td:
        work = Path(td)
        text = (
            Path(args.text)
            if args.text
            else default_text(model, (args.chunks + 1) * args.ctx_size, work)
        )
        with load_model(model, vocab_only=True) as m:
            tokens = tokenize_text(m, read_text(text))
        have = tokens.size // args.ctx_size
        if have < args.chunks:
            raise SystemExit(f"{text} has only {have} chunks of {args.ctx_size} tokens")
        tok_file = work / "tokens.npy"
        np.save(tok_file, tokens)
        log.info(
            "model %s, %d chunks x %d tokens, %d threads",
            model.name,
            args.chunks,
            args.ctx_size,
            args.threads,
        )
        jobs: dict[str, Callable[[], Timing]] = {
            "llama": lambda: run_llama(bins, model, text, args, False, work / "ref.gguf"),
            "llama-ppl": lambda: run_llama(bins, model, text, args, True, work / "ref.gguf"),
        }
        for kind in WORKERS:
            jobs[kind] = functools.partial(_run_worker, kind, model, tok_file, args)
        by, rounds = _measure(jobs, args.repeat)
    _report(by, rounds, model, args)


#: the report's ratios: name -> (numerator, denominator, whole process?)
RATIOS = {
    "speedup_no_ppl": ("llama", "ours", False),
    "ratio_to_forward_no_ppl": ("ours", "forward", False),
    "ratio_to_idle_cut": ("ours", "idle-cut", False),
    "idle_cut_ratio_to_forward": ("idle-cut", "forward", False),
    "speedup_ppl": ("llama-ppl", "ours-ppl", False),
    "speedup_ppl_whole": ("llama-ppl", "ours-ppl", True),
    "ppl_ratio_to_idle_logits": ("ours-ppl", "idle-logits", False),
    "idle_logits_ratio_to_forward_logits": ("idle-logits", "forward-logits", False),
}


def _ratio(by: dict[str, Timing], name: str) -> float:
    num, den, whole = RATIOS[name]
    if whole:
        return _wall(by[num]) / _wall(by[den])
    return by[num].seconds / by[den].seconds


def _report(
    by: dict[str, Timing], rounds: list[dict[str, Timing]], model: Path, args: argparse.Namespace
) -> None:
    summary: dict[str, Any] = {
        "model": str(model),
        "chunks": args.chunks,
        "n_ctx": args.ctx_size,
        "threads": args.threads,
        "repeat": args.repeat,
        "runs": [asdict(t) | {"tokens_per_s": t.rate} for t in by.values()],
    }
    spread = {k: [_ratio(rd, k) for rd in rounds] for k in RATIOS}
    summary |= {k: _ratio(by, k) for k in RATIOS}
    summary["per_round"] = spread
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(
        f"model {model.name}: {args.chunks} chunks x {args.ctx_size} tokens, "
        f"{args.threads} threads, median of {args.repeat} round(s)"
    )
    print(f"{'':56s} {'seconds':>8s} {'tokens/s':>9s} {'process s':>10s} {'load':>5s}")
    for t in by.values():
        wall = f"{t.wall:10.2f}" if t.wall is not None else " " * 10
        parts = ""
        if t.callback is not None:
            parts = f"  (summing {t.callback:.2f} s, perplexity {t.perplexity:.2f} s)"
        print(f"{t.name:56s} {t.seconds:8.2f} {t.rate:9.1f} {wall} {t.load:5.1f}{parts}")

    def r(k: str, digits: int = 3) -> str:
        lo, hi = min(spread[k]), max(spread[k])
        return f"{summary[k]:.{digits}f}x (per round {lo:.{digits}f}-{hi:.{digits}f})"

    print(
        f"without perplexity: {r('speedup_no_ppl', 2)} llama-imatrix (target >= 2.5), "
        f"{r('ratio_to_forward_no_ppl')} the forward pass without logits (target <= 1.10); "
        f"{r('ratio_to_idle_cut')} the do-nothing callback with the same cut (our "
        f"arithmetic), which is {r('idle_cut_ratio_to_forward')} the forward pass (scheduling)"
    )
    print(
        f"with perplexity:    {r('ppl_ratio_to_idle_logits')} the do-nothing callback with "
        f"all logits (target <= 1.05), which is {r('idle_logits_ratio_to_forward_logits')} "
        f"the forward pass with all logits; {r('speedup_ppl', 2)} llama-imatrix's loop, "
        f"{r('speedup_ppl_whole', 2)} its whole process (target >= 1.0)"
    )


def _wall(t: Timing) -> float:
    assert t.wall is not None
    return t.wall


if __name__ == "__main__":
    main()
