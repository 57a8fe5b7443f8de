"""Quality of quantized models against their base: perplexity, KL divergence, top token.

What is measured is what ``llama-perplexity --kl-divergence`` reports, on the same
tokens: the text is tokenized once (BOS added as the model wants, no special-token
parsing), cut into ``n_ctx``-token chunks whose first token is replaced by BOS, and
every chunk is evaluated from an empty KV cache; the logits of the second half of
each chunk (positions ``n_ctx/2 .. n_ctx-2``) predict the next token. For each
quantized model and each scored token:

- ``nll = -log q(next token)``; PPL = exp(mean nll) (the base's PPL the same way);
- ``KLD = sum_v p(v) (log p(v) - log q(v))`` over the full vocabulary, from the
  base's exact float32 log-probabilities (llama-perplexity stores them as uint16 steps
  and drops probabilities below e^-16; ``kld_method="llama"`` reproduces that, and the
  tests prove it equal to llama-perplexity's figures);
- "same top p": the fraction of tokens where both models' most likely token agree;
- Δp = q(next token) - p(next token); mean and RMS.

Why evaluate chunk by chunk instead of caching the base's logits: with a vocabulary
of a quarter million tokens the base's log-probabilities take about 1 MB per token
(llama-perplexity writes them all to a file). Here the base and every quantized model
are loaded side by side and decode each chunk in the same blocks of ``rows`` scored
positions, so only one block of logits per model exists at a time and nothing goes
to disk; the numpy work happens in place in llama.cpp's logits buffers plus two
``rows x n_vocab`` float32 arrays.

Memory beyond the (memory-mapped) weights: a fixed part (Python, numpy, pandas, the
llama.cpp contexts' KV caches and activations) plus
``(2 x n_models + 2) x rows x n_vocab x 4`` bytes: each context holds one block of
logits in its compute buffer and one in its output buffer (``n_outputs_max`` caps
both at ``rows``), numpy two. ``rows`` defaults to what makes one block
:data:`DEFAULT_BLOCK_MB` (benchmarks/evaluate.py measures it against llama-perplexity).
Small blocks mean many small decode graphs, and every graph node is a barrier for
llama.cpp's threads, which costs dearly when other processes share the cores; so the
models decode side by side, each on its share of ``threads`` (one thread each when
there are as many models as threads), and the block numerics run on all cores
between decodes. Small blocks are also numerically not quite llama-perplexity's,
whose ubatch holds a whole chunk: llama.cpp's matrix kernels round differently for
different batch sizes, so the figures move slightly with ``rows`` (as
llama-perplexity's move with its ``-ub``); ``rows`` of a whole chunk's scored
positions reproduces its batch layout.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import pandas as pd

from imatrix.atomic import atomic_output
from imatrix.constants import (
    DEFAULT_EVAL_SET,
    KEY_GENERAL_FILE_TYPE,
    KEY_QUANTIZE_IMATRIX_FILE,
    KEYS_QUANTIZE_IMATRIX,
    split_paths,
)
from imatrix.errors import ImatrixError
from imatrix.qtypes import QUANT_TYPES

if TYPE_CHECKING:
    from imatrix.llama_api import Model

log = logging.getLogger(__name__)

_R = TypeVar("_R")

#: numpy working memory per array of logits rows (four such arrays are live)
DEFAULT_BLOCK_MB = 32

#: The summary table's columns (one row per model, the base first), in order, and what
#: each holds. Figures a quant shares with llama-perplexity's ``--kl-divergence``
#: output are computed as it computes them; the base row has KLD 0 and top-token
#: agreement 1.
SUMMARY_COLUMN_DOCS: dict[str, str] = {
    "model": "file name without .gguf",
    "type": "llama-quantize type from general.file_type (F16, Q4_K_M, ...)",
    "recipe": "the plan whose recipe made the model (imatrix plan); null for a stock mix",
    "imatrix": "quantized with an imatrix (quantize.imatrix.* not inherited from the base)",
    "is_base": "the reference model",
    "file_size": "bytes on disk (all splits)",
    "n_params": "parameters",
    "bpw": "tensor bits per weight, as llama.cpp prints it",
    "ppl": "perplexity on the scored tokens",
    "ppl_err": "its uncertainty, as llama-perplexity prints it",
    "ln_ppl_ratio": "mean nll minus the base's: ln(PPL(Q) / PPL(base))",
    "kld_mean": "mean KL divergence from the base per scored token",
    "kld_err": "standard error of kld_mean over tokens, as llama-perplexity prints it",
    "kld_ci_low": "kld_mean - 1.96 x standard error of the per-chunk mean KLDs (NaN for one chunk)",
    "kld_ci_high": "kld_mean + 1.96 x the same standard error: a 95 % confidence interval",
    "kld_median": "median KLD",
    "kld_p99": "99th percentile of the KLD",
    "kld_max": "largest KLD of a token",
    "same_top_p": "fraction of tokens where both models' most likely token agree",
    "mean_dp": "mean of q(next token) - p(next token)",
    "rms_dp": "root mean square of the same",
    "n_tokens": "scored tokens",
    "n_chunks": "chunks of n_ctx tokens",
    "n_ctx": "chunk size",
    "path": "the model file",
    "base": "the base model file",
    "imatrix_file": "quantize.imatrix.file of the model (null when absent)",
    "text": "the evaluation text",
    "eval_set": "name of the evaluation set the text stands for (workflow evaluate.texts)",
}
SUMMARY_COLUMNS = list(SUMMARY_COLUMN_DOCS)
#: columns added later, with their value in older summaries (which can still be merged)
_ADDED_COLUMNS: dict[str, float | None] = {
    "kld_ci_low": math.nan,
    "kld_ci_high": math.nan,
    "recipe": None,
}

_ALIASES = {"Q3_K", "Q4_K", "Q5_K", "COPY"}
_FTYPE_NAMES = {v: k for k, v in reversed(QUANT_TYPES.items()) if k not in _ALIASES}


# ---------------------------------------------------------------------------
# numerics on blocks of logits rows


KLD_METHODS = ("exact", "llama")


@dataclass
class BaseBlock:
    """The base model's distribution over one block of scored positions."""

    logp: np.ndarray  # [r, V] float32, log-probabilities
    p: np.ndarray  # [r, V] float32, probabilities (0 where llama-perplexity drops them)
    nll: np.ndarray  # [r] float64, -log p(next token)
    top: np.ndarray  # [r] int64, most likely token


def _log_softmax_inplace(x: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Turn logits rows ``x`` into log-probabilities in place; ``scratch`` is left holding
    ``exp(x - max)``. Returns the float64 row sums of ``scratch``.

    Shifts by the row maximum first (llama-perplexity's stabilisation); the sums
    accumulate in float64.
    """
    x -= x.max(axis=1, keepdims=True)
    np.exp(x, out=scratch)
    sums: np.ndarray = scratch.sum(axis=1, dtype=np.float64)
    x -= np.log(sums).astype(np.float32)[:, None]
    return sums


def base_block(
    logits: np.ndarray, targets: np.ndarray, p_buf: np.ndarray, method: str = "exact"
) -> BaseBlock:
    """The base's log-probabilities (computed in place in ``logits``), probabilities (in
    ``p_buf``), nll of the next tokens and top tokens for one block.

    ``method="llama"`` reproduces what llama-perplexity compares against: the base's
    log-probabilities as it stores them in its ``--kl-divergence-base`` file (uint16
    steps over the 16 nats below the top logit) and probabilities below e^-16 dropped.
    """
    r = logits.shape[0]
    x, p = logits, p_buf[:r]
    rows = np.arange(r)
    if method == "exact":
        top = np.argmax(x, axis=1)
        sums = _log_softmax_inplace(x, p)
        p /= sums.astype(np.float32)[:, None]
    elif method == "llama":
        mx = x.max(axis=1)
        mn = np.maximum(x.min(axis=1), mx - np.float32(16))
        np.subtract(x, mx[:, None], out=p)
        np.exp(p, out=p)
        lse = np.log(p.sum(axis=1, dtype=np.float64)).astype(np.float32)
        scale = ((mx - mn) / np.float32(65535)).astype(np.float32)
        min_log_prob = (mn - mx - lse).astype(np.float32)
        with np.errstate(divide="ignore"):
            inv = np.where(scale > 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
        # the stored uint16 steps, as float32 (exact for integers below 2^24)
        np.subtract(x, mn[:, None], out=p)
        p *= inv[:, None]
        np.rint(p, out=p)
        p[x <= mn[:, None]] = 0
        np.multiply(p, scale[:, None], out=x)
        x += min_log_prob[:, None]
        top = np.argmax(x, axis=1)
        np.exp(x, out=p)
        p[x <= np.float32(-16)] = 0
    else:
        raise ImatrixError(f"unknown KLD method '{method}' (use {' or '.join(KLD_METHODS)})")
    nll = -x[rows, targets].astype(np.float64)
    return BaseBlock(x, p, nll, top)


@dataclass
class BlockStats:
    """Per-token results of one quantized model on one block."""

    nll: np.ndarray  # float64 [r]
    kld: np.ndarray  # float64 [r]
    dp: np.ndarray  # float64 [r]
    same_top: np.ndarray  # bool [r]


def compare_block(
    logits: np.ndarray, targets: np.ndarray, base: BaseBlock, work_buf: np.ndarray
) -> BlockStats:
    """KLD(base || quant) over the whole vocabulary, nll, Δp and top-token agreement.

    ``logits`` (the quantized model's, overwritten with its log-probabilities) and
    ``work_buf`` are the only memory used. The KLD is summed as ``p (log p - log q)``
    term by term (not as cross-entropy minus entropy) so that small divergences are
    not lost to cancellation.
    """
    r = logits.shape[0]
    work = work_buf[:r]
    top = np.argmax(logits, axis=1)
    _log_softmax_inplace(logits, work)
    np.subtract(base.logp, logits, out=work)
    work *= base.p
    kld = work.sum(axis=1, dtype=np.float64)
    nll = -logits[np.arange(r), targets].astype(np.float64)
    dp = np.exp(-nll) - np.exp(-base.nll)
    return BlockStats(nll, kld, dp, top == base.top)


class RowPool:
    """Runs the block numerics on row slices in parallel threads.

    numpy releases the GIL in its loops, so the vocabulary-wide passes over a block
    scale with the cores, which sit idle between llama.cpp's decode calls
    (llama-perplexity likewise processes logits on every hardware thread).
    """

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self._pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None

    def slices(self, r: int) -> list[slice]:
        n = min(self.workers, r)
        bounds = np.linspace(0, r, n + 1).astype(int)
        return [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]

    def _map(self, fn: Callable[[slice], _R], items: list[slice]) -> list[_R]:
        if self._pool is None or len(items) == 1:
            return [fn(it) for it in items]
        return list(self._pool.map(fn, items))

    def base(
        self, logits: np.ndarray, targets: np.ndarray, p_buf: np.ndarray, method: str
    ) -> BaseBlock:
        r = logits.shape[0]
        parts = self._map(
            lambda sl: base_block(logits[sl], targets[sl], p_buf[sl], method), self.slices(r)
        )
        return BaseBlock(
            logits,
            p_buf[:r],
            np.concatenate([b.nll for b in parts]),
            np.concatenate([b.top for b in parts]),
        )

    def compare(
        self, logits: np.ndarray, targets: np.ndarray, base: BaseBlock, work_buf: np.ndarray
    ) -> BlockStats:
        def one(sl: slice) -> BlockStats:
            sub = BaseBlock(base.logp[sl], base.p[sl], base.nll[sl], base.top[sl])
            return compare_block(logits[sl], targets[sl], sub, work_buf[sl])

        parts = self._map(one, self.slices(logits.shape[0]))
        return BlockStats(
            *(
                np.concatenate([getattr(b, f) for b in parts])
                for f in ("nll", "kld", "dp", "same_top")
            )
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


# ---------------------------------------------------------------------------
# accumulation and summaries


@dataclass
class Accumulator:
    """All per-token values of one model (a few floats per scored token)."""

    nll: list[np.ndarray] = field(default_factory=list)
    kld: list[np.ndarray] = field(default_factory=list)
    dp: list[np.ndarray] = field(default_factory=list)
    same_top: list[np.ndarray] = field(default_factory=list)

    #: mean KLD of each chunk (for the confidence interval of the mean)
    chunk_kld: list[float] = field(default_factory=list)
    _chunk_start: int = 0

    def add(self, s: BlockStats) -> None:
        self.nll.append(s.nll)
        self.kld.append(s.kld)
        self.dp.append(s.dp)
        self.same_top.append(s.same_top)

    def end_chunk(self) -> None:
        """Close a chunk: record the mean KLD of the blocks added since the last one."""
        blocks = self.kld[self._chunk_start :]
        if blocks:
            self.chunk_kld.append(float(np.concatenate(blocks).mean()))
        self._chunk_start = len(self.kld)


def _mean_err(x: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error, as llama-perplexity's ``mean_and_uncertainty``."""
    n = x.size
    if n == 0:
        return 0.0, 0.0
    f = float(x.mean())
    var = float(np.mean(x * x)) - f * f
    return f, (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


#: two-sided 95 % normal quantile, for the confidence interval of the mean KLD
_Z95 = 1.96


def chunk_ci(mean: float, chunk_means: Sequence[float]) -> tuple[float, float]:
    """``mean ± 1.96 x`` the standard error of the per-chunk means (NaN for one chunk).

    Why per chunk and not per token (``kld_err``, llama-perplexity's figure): tokens of
    one chunk share their context, so their divergences are correlated and the
    per-token standard error is too small; chunks are evaluated independently.
    """
    n = len(chunk_means)
    if n < 2:
        return math.nan, math.nan
    se = float(np.std(np.asarray(chunk_means, dtype=np.float64), ddof=1)) / math.sqrt(n)
    return mean - _Z95 * se, mean + _Z95 * se


def summarize(acc: Accumulator, base_nll: np.ndarray) -> dict[str, float]:
    """The statistics llama-perplexity prints, from per-token values."""
    nll = np.concatenate(acc.nll)
    kld = np.concatenate(acc.kld)
    dp = np.concatenate(acc.dp)
    top = np.concatenate(acc.same_top)
    lp, lp_err = _mean_err(nll)
    kl, kl_err = _mean_err(kld)
    ci_low, ci_high = chunk_ci(kl, acc.chunk_kld)
    return {
        "ppl": math.exp(lp),
        "ppl_err": math.exp(lp) * lp_err,
        "ln_ppl_ratio": lp - float(base_nll.mean()),
        "kld_mean": kl,
        "kld_err": kl_err,
        "kld_ci_low": ci_low,
        "kld_ci_high": ci_high,
        "kld_median": float(np.median(kld)),
        "kld_p99": float(np.percentile(kld, 99.0)),
        "kld_max": float(kld.max()),
        "same_top_p": float(top.mean()),
        "mean_dp": float(dp.mean()),
        "rms_dp": float(np.sqrt(np.mean(dp * dp))),
        "n_tokens": int(nll.size),
    }


def base_summary(base_nll: np.ndarray) -> dict[str, float]:
    lp, lp_err = _mean_err(base_nll)
    return {
        "ppl": math.exp(lp),
        "ppl_err": math.exp(lp) * lp_err,
        "ln_ppl_ratio": 0.0,
        "kld_mean": 0.0,
        "kld_err": 0.0,
        "kld_ci_low": 0.0,
        "kld_ci_high": 0.0,
        "kld_median": 0.0,
        "kld_p99": 0.0,
        "kld_max": 0.0,
        "same_top_p": 1.0,
        "mean_dp": 0.0,
        "rms_dp": 0.0,
        "n_tokens": int(base_nll.size),
    }


# ---------------------------------------------------------------------------
# models


@dataclass
class ModelFacts:
    """What the summary says about a model file besides its quality."""

    path: Path
    name: str
    type: str
    imatrix_file: str | None
    #: the four ``quantize.imatrix.*`` values (None where absent)
    imatrix_keys: tuple[str | None, ...]
    file_size: int
    n_params: int
    bpw: float


def _split_files(path: Path) -> list[Path]:
    """All splits of a split model (``X-00001-of-00003.gguf``) when all exist, else the
    file itself."""
    splits = split_paths(path)
    return splits if all(s.is_file() for s in splits) else [path]


def model_facts(model: Model) -> ModelFacts:
    """Type (from ``general.file_type``), imatrix use (``quantize.imatrix.file``),
    file size and bits per weight (tensor bytes x 8 / parameters, as llama.cpp prints)."""
    import llama_cpp

    ftype_s = model.meta(KEY_GENERAL_FILE_TYPE)
    try:
        ftype = int(ftype_s) & ~1024 if ftype_s is not None else None
    except ValueError:
        ftype = None
    qtype = _FTYPE_NAMES.get(ftype, f"ftype{ftype}") if ftype is not None else "unknown"
    n_params = int(llama_cpp.llama_model_n_params(model.ptr))
    size = int(llama_cpp.llama_model_size(model.ptr))
    files = _split_files(model.path)
    return ModelFacts(
        path=model.path,
        name=model.path.name.removesuffix(".gguf"),
        type=qtype,
        imatrix_file=model.meta(KEY_QUANTIZE_IMATRIX_FILE),
        imatrix_keys=tuple(model.meta(k) for k in KEYS_QUANTIZE_IMATRIX),
        file_size=sum(f.stat().st_size for f in files),
        n_params=n_params,
        bpw=size * 8.0 / n_params if n_params else float("nan"),
    )


def chunk_tokens(tokens: np.ndarray, n_ctx: int, n_chunks: int, bos: int | None) -> np.ndarray:
    """``[n_chunks, n_ctx]`` token windows, the first of each replaced by BOS when the
    model adds one (llama-perplexity does this in place for every chunk)."""
    out = tokens[: n_chunks * n_ctx].reshape(n_chunks, n_ctx).copy()
    if bos is not None:
        out[:, 0] = bos
    return out


def default_workers() -> int:
    """Threads for the numpy side: every usable CPU (as llama-perplexity's logits work)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def default_rows(n_vocab: int, n_scored: int, block_mb: float = DEFAULT_BLOCK_MB) -> int:
    """Logits rows per block so that one ``rows x n_vocab`` float32 array fits ``block_mb``."""
    rows = int(block_mb * 2**20 // (4 * max(n_vocab, 1)))
    return max(1, min(rows, n_scored))


# ---------------------------------------------------------------------------
# the evaluation


@dataclass(frozen=True)
class EvalPlan:
    """How the text is cut and decoded: chunks, scored positions, block rows, threads."""

    n_ctx: int
    n_chunks: int
    #: first scored position of a chunk (its logits predict the token after it)
    first: int
    n_scored: int
    rows: int
    n_threads: int
    #: models decoding side by side, each on ``n_threads // n_workers`` threads
    n_workers: int


def _check_arguments(
    quants: Sequence[object], n_ctx: int, chunks: int | None, kld_method: str
) -> None:
    if n_ctx < 4:
        raise ImatrixError(f"context size must be at least 4, got {n_ctx}")
    if chunks is not None and chunks <= 0:
        raise ImatrixError(f"--chunks must be positive, got {chunks}")
    if not quants:
        raise ImatrixError("nothing to evaluate: give at least one quantized model")
    if kld_method not in KLD_METHODS:
        raise ImatrixError(f"unknown KLD method '{kld_method}' (use {' or '.join(KLD_METHODS)})")


def make_plan(
    n_tokens: int,
    n_vocab: int,
    n_models: int,
    *,
    n_ctx: int,
    chunks: int | None,
    rows: int | None,
    threads: int,
) -> EvalPlan:
    """The chunks, block size and thread split for ``n_tokens`` tokens of text.

    The models decode side by side, each on its share of the threads: small blocks make
    many small graphs, and one model per thread avoids the thread barriers inside each
    graph (costly when other processes share the cores).
    """
    n_max = n_tokens // n_ctx
    n_chunks = n_max if chunks is None else min(chunks, n_max)
    first = n_ctx // 2
    n_scored = n_ctx - 1 - first
    r = rows if rows else default_rows(n_vocab, n_scored)
    n_workers = max(1, min(threads, n_models))
    return EvalPlan(
        n_ctx=n_ctx,
        n_chunks=n_chunks,
        first=first,
        n_scored=n_scored,
        rows=max(1, min(r, n_scored)),
        n_threads=threads,
        n_workers=n_workers,
    )


def _load_quants(
    stack: contextlib.ExitStack,
    bm: Model,
    base: str | os.PathLike[str],
    quants: Sequence[str | os.PathLike[str]],
    n_gpu_layers: int,
) -> list[Model]:
    """Every quant, each closed by ``stack``; refuses one with another vocabulary."""
    from imatrix.llama_api import load_model

    models = []
    for q in quants:
        qm = stack.enter_context(load_model(q, n_gpu_layers=n_gpu_layers))
        models.append(qm)
        if qm.n_vocab != bm.n_vocab:
            raise ImatrixError(
                f"{q}: vocabulary of {qm.n_vocab} tokens differs from the base's "
                f"{bm.n_vocab} ({base})"
            )
    return models


def _text_tokens(
    model: Model, data: bytes, text: object, n_ctx: int, parse_special: bool
) -> np.ndarray:
    """The text's tokens as llama-perplexity makes them; at least two chunks' worth."""
    from imatrix.llama_api import tokenize

    tokens = tokenize(model, data, add_special=True, parse_special=parse_special)
    if tokens.size < 2 * n_ctx:
        raise ImatrixError(
            f"{text}: tokenizes to only {tokens.size} tokens; at least {2 * n_ctx} are "
            f"needed for a context of {n_ctx}"
        )
    return tokens


class _Decoders:
    """One llama.cpp context per model, decoding each block side by side."""

    def __init__(self, stack: contextlib.ExitStack, models: list[Model], plan: EvalPlan) -> None:
        from imatrix.llama_api import Batch, Context

        self.contexts = [
            stack.enter_context(
                Context(
                    m,
                    n_ctx=plan.n_ctx,
                    n_batch=plan.n_ctx,
                    n_ubatch=min(512, plan.n_ctx),
                    n_seq_max=1,
                    n_threads=max(1, plan.n_threads // plan.n_workers),
                    n_outputs_max=plan.rows,
                )
            )
            for m in models
        ]
        self.batch = Batch(plan.n_ctx)
        self._pool: ThreadPoolExecutor | None = None
        if plan.n_workers > 1:
            self._pool = ThreadPoolExecutor(plan.n_workers)
            stack.callback(self._pool.shutdown)

    def clear(self) -> None:
        for ctx in self.contexts:
            ctx.clear()

    def decode(self, tokens: np.ndarray, pos: np.ndarray, want: np.ndarray) -> None:
        """Decode one batch in every context (logits only where ``want``)."""
        self.batch.set(tokens, pos, 0, want)
        if self._pool is None:
            for ctx in self.contexts:
                ctx.decode(self.batch)
        else:
            list(self._pool.map(lambda ctx: ctx.decode(self.batch), self.contexts))


@dataclass
class _Work:
    """The numpy side of an evaluation: buffers, row threads and the accumulated values."""

    pool: RowPool
    p_buf: np.ndarray
    work_buf: np.ndarray
    kld_method: str
    accs: list[Accumulator]
    base_nll: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def create(
        cls, stack: contextlib.ExitStack, plan: EvalPlan, n_vocab: int, method: str, n_quants: int
    ) -> _Work:
        """Buffers of one block, and row threads on every CPU (stopped by ``stack``)."""
        pool = RowPool(default_workers())
        stack.callback(pool.close)
        return cls(
            pool=pool,
            p_buf=np.empty((plan.rows, n_vocab), dtype=np.float32),
            work_buf=np.empty((plan.rows, n_vocab), dtype=np.float32),
            kld_method=method,
            accs=[Accumulator() for _ in range(n_quants)],
        )

    def block(self, decoders: _Decoders, n_rows: int, targets: np.ndarray) -> None:
        """Score one decoded block: the base's distribution, then each quant against it."""
        ctxs = decoders.contexts
        bb = self.pool.base(ctxs[0].logits(n_rows), targets, self.p_buf, self.kld_method)
        self.base_nll.append(bb.nll)
        for ctx, acc in zip(ctxs[1:], self.accs, strict=True):
            acc.add(self.pool.compare(ctx.logits(n_rows), targets, bb, self.work_buf))


def evaluate_chunk(
    decoders: _Decoders, work: _Work, plan: EvalPlan, window: np.ndarray, targets: np.ndarray
) -> None:
    """One chunk from an empty cache, in blocks of ``plan.rows`` scored positions.

    Each decode continues the chunk from where the previous block ended; only the
    scored positions of the block ask for logits. ``targets`` are the next tokens of
    the scored positions, taken from the text (not the BOS-patched window).
    """
    decoders.clear()
    start = 0
    end = plan.first + plan.n_scored
    for lo in range(plan.first, end, plan.rows):
        hi = min(lo + plan.rows, end)
        pos = np.arange(start, hi, dtype=np.int32)
        decoders.decode(window[start:hi], pos, pos >= lo)
        work.block(decoders, hi - lo, targets[lo - plan.first : hi - plan.first])
        start = hi
    for acc in work.accs:
        acc.end_chunk()


def _run_chunks(
    decoders: _Decoders, work: _Work, plan: EvalPlan, tokens: np.ndarray, bos: int | None
) -> np.ndarray:
    """Every chunk; returns the base's per-token nll."""
    from tqdm import tqdm

    windows = chunk_tokens(tokens, plan.n_ctx, plan.n_chunks, bos)
    for c in tqdm(range(plan.n_chunks), desc="evaluate", unit="chunk", disable=None):
        off = c * plan.n_ctx
        targets = tokens[off + plan.first + 1 : off + plan.n_ctx]
        evaluate_chunk(decoders, work, plan, windows[c], targets)
    return np.concatenate(work.base_nll)


def summary_table(
    facts: list[ModelFacts],
    base_nll: np.ndarray,
    accs: list[Accumulator],
    common: dict[str, object],
    recipes: Sequence[str | None] = (),
) -> pd.DataFrame:
    """One row per model (the base first) with the columns :data:`SUMMARY_COLUMNS`;
    ``recipes``: the plan name of each quant (None for a stock mix)."""
    rows_out = []
    recipe_of = [None, *recipes]
    for i, f in enumerate(facts):
        stats = base_summary(base_nll) if i == 0 else summarize(accs[i - 1], base_nll)
        rows_out.append(
            {
                "model": f.name,
                "type": f.type,
                "recipe": recipe_of[i] if i < len(recipe_of) else None,
                # quantized with an imatrix: it has quantize.imatrix.* entries that it did
                # not inherit from the base (a base requantized from an imatrix quant
                # passes its entries on to every quant made from it)
                "imatrix": i > 0
                and f.imatrix_file is not None
                and f.imatrix_keys != facts[0].imatrix_keys,
                "is_base": i == 0,
                "file_size": f.file_size,
                "n_params": f.n_params,
                "bpw": f.bpw,
                **stats,
                **common,
                "path": str(f.path),
                "imatrix_file": f.imatrix_file,
            }
        )
    return pd.DataFrame(rows_out, columns=SUMMARY_COLUMNS)


def evaluate(
    base: str | os.PathLike[str],
    quants: Sequence[str | os.PathLike[str]],
    text: str | os.PathLike[str],
    *,
    n_ctx: int = 512,
    chunks: int | None = None,
    threads: int | None = None,
    rows: int | None = None,
    n_gpu_layers: int = -1,
    parse_special: bool = False,
    kld_method: str = "exact",
    recipes: Mapping[str, str] | None = None,
    eval_set: str = DEFAULT_EVAL_SET,
) -> pd.DataFrame:
    """Evaluate ``quants`` against ``base`` on the text file ``text``.

    Returns one row per model (the base first, ``is_base`` True, KLD 0) with the
    columns :data:`SUMMARY_COLUMNS`. ``n_ctx`` and ``chunks`` mean what ``-c`` and
    ``--chunks`` mean to llama-perplexity (the text must give at least two chunks);
    ``threads`` (default: the physical cores) are shared by the models, which decode
    side by side; ``rows`` is the block size (logits rows decoded and compared at
    once), default from :func:`default_rows`; ``kld_method`` "exact" or "llama" (see
    the module docstring); ``recipes`` maps a quant (as given in ``quants``) to the name
    of the plan that made it, for the ``recipe`` column; ``eval_set`` names the text's
    set in the table. Raises :class:`ImatrixError` for a text that is too
    short, a model that does not load, or models with different vocabularies.
    """
    from imatrix.llama_api import default_threads, load_model
    from imatrix.tokenize import read_text

    _check_arguments(quants, n_ctx, chunks, kld_method)
    data = read_text(Path(text))
    with contextlib.ExitStack() as stack:
        bm = stack.enter_context(load_model(base, n_gpu_layers=n_gpu_layers))
        tokens = _text_tokens(bm, data, text, n_ctx, parse_special)
        models = [bm, *_load_quants(stack, bm, base, quants, n_gpu_layers)]
        n_threads = threads if threads and threads > 0 else default_threads()
        plan = make_plan(
            tokens.size,
            bm.n_vocab,
            len(models),
            n_ctx=n_ctx,
            chunks=chunks,
            rows=rows,
            threads=n_threads,
        )
        decoders = _Decoders(stack, models, plan)
        log.info(
            "evaluating %d model(s) against %s: %d chunks of %d tokens, %d scored per chunk, "
            "blocks of %d rows x %d vocabulary",
            *(len(quants), base, plan.n_chunks, n_ctx, plan.n_scored, plan.rows, bm.n_vocab),
        )
        work = _Work.create(stack, plan, bm.n_vocab, kld_method, len(quants))
        bnll = _run_chunks(decoders, work, plan, tokens, bm.bos if bm.add_bos else None)
        facts = [model_facts(m) for m in models]
    common = {
        "n_chunks": plan.n_chunks,
        "n_ctx": n_ctx,
        "base": str(base),
        "text": str(text),
        "eval_set": eval_set,
    }
    names = [(recipes or {}).get(os.fspath(q)) for q in quants]
    return summary_table(facts, bnll, work.accs, common, names)


def write_summary(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write the summary table as Parquet, atomically."""
    out = Path(path)
    with atomic_output(out) as tmp:
        df.to_parquet(tmp, index=False)
    return out


def merge_summaries(
    paths: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str] | None = None
) -> pd.DataFrame:
    """Concatenate per-quant summaries (one evaluate run each) into one table.

    The base row each run repeats is kept once per base model and text (the first);
    rows are ordered base first, then by bits per weight. Written atomically to
    ``output`` when given.
    """
    frames = []
    for p in paths:
        try:
            frames.append(pd.read_parquet(p))
        except FileNotFoundError:
            raise ImatrixError(f"{p}: no such summary file") from None
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise ImatrixError(f"{p}: not a readable Parquet summary: {exc}") from None
    if not frames:
        raise ImatrixError("no summaries to merge")
    df = pd.concat(frames, ignore_index=True)
    for col, value in _ADDED_COLUMNS.items():  # summaries written before the column existed
        if col not in df.columns:
            df[col] = value
    if "eval_set" not in df.columns:  # likewise: they were on one text
        df["eval_set"] = DEFAULT_EVAL_SET
    df["eval_set"] = df["eval_set"].fillna(DEFAULT_EVAL_SET)
    missing = [c for c in SUMMARY_COLUMNS if c not in df.columns]
    if missing:
        raise ImatrixError(f"summary lacks columns {missing}")
    df = df.drop_duplicates(
        subset=["path", "base", "text", "eval_set", "n_ctx", "n_chunks"], keep="first"
    )
    df = df.sort_values(["is_base", "bpw"], ascending=[False, True], kind="stable")
    df = df.reset_index(drop=True)[SUMMARY_COLUMNS]
    if output is not None:
        write_summary(df, output)
    return df
