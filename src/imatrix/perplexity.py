"""Perplexity as llama-imatrix reports it, computed over the logits in bulk.

llama-imatrix scores the second half of every chunk (positions ``n_ctx/2`` to
``n_ctx-2`` predicting the next token), accumulates the negative log-likelihood and
its square in double precision over all chunks, prints the running estimate
``exp(nll / count)`` after each chunk, and finally ``PPL = exp(mean nll)`` with the
error ``sqrt(var(nll) / (count - 1)) * PPL``. Each log-softmax is computed as
``logit[tok] - max - log(sum(expf(logit - max)))`` with float32 differences and
exponentials summed in double; we do the same per block of rows, with the vectorized
kernel of ggml's CPU backend (:mod:`imatrix.ggml_vec`), or numpy where the loaded
build lacks it.
"""

from __future__ import annotations

import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imatrix.ggml_vec import ggml_exp_sum, row_exp_sums

#: float32 bytes of logits per block: one or a few rows, so that the passes over a
#: block (max, subtract, exp, sum) run in the CPU cache
_BLOCK_BYTES = 1 << 20
#: numpy path: a row's exponentials are summed in float32 (pairwise, accurate) over
#: segments of this many values, and the segment sums in float64, like llama.cpp's
#: double accumulator
_SEGMENT = 8192


def _nll_rows(logits: np.ndarray, targets: np.ndarray, out: np.ndarray) -> None:
    exp_sum = ggml_exp_sum()
    if exp_sum is None or not logits.flags.c_contiguous:
        _nll_rows_numpy(logits, targets, out)
        return
    n = logits.shape[0]
    rows = max(1, _BLOCK_BYTES // (4 * logits.shape[1]))
    for i in range(0, n, rows):
        blk = logits[i : i + rows]
        m = blk.max(axis=1)
        # logit[tok] - max in float32, as llama.cpp computes it
        picked = (blk[np.arange(blk.shape[0]), targets[i : i + rows]] - m).astype(np.float64)
        out[i : i + rows] = np.log(row_exp_sums(exp_sum, blk, m)) - picked


def _nll_rows_numpy(logits: np.ndarray, targets: np.ndarray, out: np.ndarray) -> None:
    """:func:`_nll_rows` with numpy's exponentials (no ggml kernel available)."""
    n, v = logits.shape
    rows = max(1, _BLOCK_BYTES // (4 * v))
    buf = np.empty((min(rows, n), v), dtype=np.float32)
    main = v - v % _SEGMENT
    for i in range(0, n, rows):
        blk = logits[i : i + rows]
        r = blk.shape[0]
        d = buf[:r]
        m = blk.max(axis=1, keepdims=True)
        np.subtract(blk, m, out=d)
        picked = d[np.arange(r), targets[i : i + r]].astype(np.float64)
        np.exp(d, out=d)
        s = np.zeros(r)
        if main:
            s += d[:, :main].reshape(r, -1, _SEGMENT).sum(axis=2).sum(axis=1, dtype=np.float64)
        if main < v:
            s += d[:, main:].sum(axis=1).astype(np.float64)
        out[i : i + r] = np.log(s) - picked


def token_nll(
    logits: np.ndarray,
    targets: np.ndarray,
    pool: ThreadPoolExecutor | None = None,
    parts: int = 1,
) -> np.ndarray:
    """Negative log-likelihood (float64) of ``targets[i]`` under the row ``logits[i]``.

    With a thread pool the rows are split into ``parts``: the caller computes the
    first, the pool the others (numpy releases the GIL in these loops).
    """
    logits = np.asarray(logits, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.int64)
    n = logits.shape[0]
    out = np.empty(n, dtype=np.float64)
    k = max(1, min(parts if pool is not None else 1, n))
    edges = [n * j // k for j in range(k + 1)]
    spans = list(itertools.pairwise(edges))
    futures = (
        [pool.submit(_nll_rows, logits[a:b], targets[a:b], out[a:b]) for a, b in spans[1:]]
        if pool is not None
        else []
    )
    a, b = spans[0]
    _nll_rows(logits[a:b], targets[a:b], out[a:b])
    for f in futures:
        f.result()
    return out


@dataclass
class Perplexity:
    """Running perplexity over chunks, with llama-imatrix's numbers."""

    nll: float = 0.0
    nll2: float = 0.0
    count: int = 0
    #: running estimate after each chunk (what llama-imatrix prints as ``[k]value``)
    running: list[float] = field(default_factory=list)

    def add_chunk(self, nll: np.ndarray) -> float:
        """Add one chunk's per-token NLLs; returns the running estimate."""
        self.nll += float(nll.sum())
        self.nll2 += float(np.square(nll).sum())
        self.count += int(nll.size)
        value = math.exp(self.nll / self.count) if self.count else float("nan")
        self.running.append(value)
        return value

    @property
    def ppl(self) -> float | None:
        return math.exp(self.nll / self.count) if self.count else None

    @property
    def error(self) -> float | None:
        """``sqrt(var / (count - 1)) * PPL``; None where llama-imatrix reports none."""
        if self.count < 2:
            return None
        mean = self.nll / self.count
        var = self.nll2 / self.count - mean * mean
        if var <= 0:
            return None
        return math.sqrt(var / (self.count - 1)) * math.exp(mean)

    def state(self) -> dict[str, Any]:
        return {"nll": self.nll, "nll2": self.nll2, "count": self.count, "running": self.running}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Perplexity:
        return cls(
            nll=float(state["nll"]),
            nll2=float(state["nll2"]),
            count=int(state["count"]),
            running=[float(x) for x in state["running"]],
        )
