"""Perplexity as llama-imatrix reports it, computed with numpy over the logits in bulk.

llama-imatrix scores the second half of every chunk (positions ``n_ctx/2`` to
``n_ctx-2`` predicting the next token), accumulates the negative log-likelihood and
its square in double precision over all chunks, prints the running estimate
``exp(nll / count)`` after each chunk, and finally ``PPL = exp(mean nll)`` with the
error ``sqrt(var(nll) / (count - 1)) * PPL``. Each log-softmax is computed as
``logit[tok] - max - log(sum(expf(logit - max)))`` with float32 differences and
exponentials summed in double; we do the same, vectorized per block of rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

#: rows per vectorized block: bounds the temporary arrays (rows x n_vocab float32)
_BLOCK_ROWS = 32


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood (float64) of ``targets[i]`` under the row ``logits[i]``."""
    n = logits.shape[0]
    out = np.empty(n, dtype=np.float64)
    for i in range(0, n, _BLOCK_ROWS):
        blk = np.asarray(logits[i : i + _BLOCK_ROWS], dtype=np.float32)
        tok = np.asarray(targets[i : i + _BLOCK_ROWS], dtype=np.int64)
        d = blk - blk.max(axis=1, keepdims=True)
        picked = d[np.arange(d.shape[0]), tok].astype(np.float64)
        np.exp(d, out=d)
        s = d.sum(axis=1, dtype=np.float64)
        out[i : i + blk.shape[0]] = -(picked - np.log(s))
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

    def state(self) -> dict:
        return {"nll": self.nll, "nll2": self.nll2, "count": self.count, "running": self.running}

    @classmethod
    def from_state(cls, state: dict) -> Perplexity:
        return cls(
            nll=float(state["nll"]),
            nll2=float(state["nll2"]),
            count=int(state["count"]),
            running=[float(x) for x in state["running"]],
        )
