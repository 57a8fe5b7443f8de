"""Column sums of activations, accumulated in float64: the collector's inner loop.

For every observed matrix multiplication the collector needs, per input channel,
the sum of squares and the plain sum of the activation rows (per expert for MoE).
This runs inside llama.cpp's eval callback while llama.cpp's threads wait, so it is
on the critical path: numpy does not fuse ``astype -> square -> sum``, and a float64
copy of every activation matrix costs more than the rest of the callback.

So, for dense matrices: squares are formed in float32, as llama.cpp forms them, and
summed over groups of :data:`GROUP` rows in float32; the group sums go into float64
accumulators. Expert (MoE) inputs, gathered per expert, are summed in float64.
Columns can be split across threads (numpy releases the GIL in these loops); the
result does not depend on the split.

Error bound (any data, any summation order numpy picks; ``u = 2**-24`` and
``v = 2**-53`` are the float32 and float64 unit roundoffs, ``n`` the rows summed in one
call): for a column ``x_1..x_n`` of float32 activations, with ``S2 = sum x_i**2`` and
``S1 = sum |x_i|`` computed exactly,

- :meth:`ColumnSums.dense`: ``|sum of squares - S2| <= (17 u + 2 n v) S2 + n 2**-149``
  (one rounding of each square plus 15 additions in a float32 group: ``gamma_16``; the
  float64 sum of the group sums; the last term covers squares that underflow to
  float32 subnormals), and ``|sum - sum x_i| <= (17 u + 2 n v) S1``;
- :meth:`ColumnSums.grouped`: ``(2 n v) S2`` and ``(2 n v) S1`` (squares of float32
  values are exact in float64).

The float32 part of the bound does not grow with ``n`` or with the number of chunks
(the float64 accumulators add ``v`` per addition), unlike llama-imatrix's single
float32 accumulator, whose error grows with every row it adds.
tests/test_activations.py checks these bounds on adversarial inputs.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np

#: float64 bytes per row block: small enough to stay in a core's L2 cache
_BLOCK_BYTES = 512 * 1024
#: rows summed in float32 before their sum joins the float64 accumulator
GROUP = 16
#: below this many elements a second thread costs more than it saves
_PARALLEL_MIN = 1 << 16


def _dense_part_exact(x: np.ndarray, sq: np.ndarray, s: np.ndarray | None, block: int) -> None:
    """Every square and every addition in float64."""
    for i in range(0, x.shape[0], block):
        b = x[i : i + block].astype(np.float64)
        if s is not None:
            s += np.add.reduce(b, axis=0)
        sq += np.einsum("ij,ij->j", b, b)


def _dense_part(x: np.ndarray, sq: np.ndarray, s: np.ndarray | None, block: int) -> None:
    """Squares formed in float32 (as llama.cpp forms them) and summed over groups of
    :data:`GROUP` rows in float32; the group sums are accumulated in float64.

    Faster than :func:`_dense_part_exact` (no float64 copy of the rows); the error of a
    group sum is bounded by ``gamma_16`` in float32 and does not grow with the number
    of rows or chunks (see the module docstring for the bound). ``s`` None: no plain sums.
    """
    n = x.shape[0]
    m = n - n % GROUP
    if m:
        g = x[:m].reshape(m // GROUP, GROUP, x.shape[1])
        sq += np.einsum("bij,bij->bj", g, g).sum(axis=0, dtype=np.float64)
        if s is not None:
            s += np.add.reduce(g, axis=1).sum(axis=0, dtype=np.float64)
    if m < n:
        _dense_part_exact(x[m:], sq, s, block)


def _grouped_part(
    x: np.ndarray, rows: np.ndarray, starts: np.ndarray, sq: np.ndarray, s: np.ndarray | None
) -> None:
    b = x[rows].astype(np.float64)
    if s is not None:
        s += np.add.reduceat(b, starts, axis=0)
    np.multiply(b, b, out=b)
    sq += np.add.reduceat(b, starts, axis=0)


def _part(s: np.ndarray | None, index: slice | tuple[slice, slice]) -> np.ndarray | None:
    """A view of the plain sums for one thread's columns (None without plain sums)."""
    return None if s is None else s[index]


class ColumnSums:
    """Computes ``(sum of x**2, sum of x)`` over rows, in float64, with ``threads`` threads.

    ``with_sums=False`` leaves out the plain sums (None in their place): an output that
    cannot store them (llama-imatrix's formats) needs only the squares, and the plain
    sums are a second pass over every activation."""

    def __init__(
        self, threads: int = 1, pool: ThreadPoolExecutor | None = None, with_sums: bool = True
    ) -> None:
        """``threads``: parts the columns are split into (the caller computes one); the
        others run on ``pool``, or on a pool of ``threads - 1`` owned by this object."""
        self.with_sums = with_sums
        self.threads = max(1, int(threads))
        self._own = pool is None and self.threads > 1
        self._pool = (
            pool
            if pool is not None
            else (ThreadPoolExecutor(self.threads - 1) if self._own else None)
        )
        if self.threads == 1:
            self._pool = None

    def _slices(self, n_cols: int, n_elems: int) -> list[slice]:
        k = self.threads if self._pool is not None and n_elems >= _PARALLEL_MIN else 1
        k = min(k, max(1, n_cols // 64))
        edges = [round(i * n_cols / k / 16) * 16 for i in range(k)] + [n_cols]
        return [slice(a, b) for a, b in itertools.pairwise(edges) if b > a]

    def dense(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Column sums of a 2-D float32 array ``[rows, cols]``."""
        c = x.shape[1]
        sq = np.zeros(c)
        s = np.zeros(c) if self.with_sums else None
        parts = self._slices(c, x.size)
        # row blocks depend on the full width only: the same sums whatever the threads
        block = max(1, _BLOCK_BYTES // (8 * max(c, 1)))
        futures = (
            [self._pool.submit(_dense_part, x[:, p], sq[p], _part(s, p), block) for p in parts[1:]]
            if self._pool is not None
            else []
        )
        _dense_part(x[:, parts[0]], sq[parts[0]], _part(s, parts[0]), block)
        for f in futures:
            f.result()
        return sq, s

    def grouped(
        self, x: np.ndarray, rows: np.ndarray, starts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Column sums of ``x[rows]`` per segment ``[starts[i], starts[i+1])`` of ``rows``."""
        c = x.shape[1]
        sq = np.zeros((starts.size, c))
        s = np.zeros((starts.size, c)) if self.with_sums else None
        parts = self._slices(c, rows.size * c)
        futures = (
            [
                self._pool.submit(
                    _grouped_part, x[:, p], rows, starts, sq[:, p], _part(s, (slice(None), p))
                )
                for p in parts[1:]
            ]
            if self._pool is not None
            else []
        )
        _grouped_part(
            x[:, parts[0]], rows, starts, sq[:, parts[0]], _part(s, (slice(None), parts[0]))
        )
        for f in futures:
            f.result()
        return sq, s

    def close(self) -> None:
        if self._pool is not None and self._own:
            self._pool.shutdown(wait=True)
        self._pool = None
