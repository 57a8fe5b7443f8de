"""The activation sums' error bound (stated in imatrix.activations), against exact sums.

The reference is exact: squares of float32 values are exact in float64, and
``math.fsum`` adds them with a single rounding. Inputs are adversarial: a dynamic
range from float32 subnormal squares to 1e36, one huge value followed by tiny ones in
every group (the worst case for a float32 group sum), cancelling signs, and many rows.
A naive float32 running sum fails the same bound, so the test can catch a regression
to float32 accumulation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from imatrix.activations import GROUP, ColumnSums

U = 2.0**-24  # float32 unit roundoff
V = 2.0**-53  # float64 unit roundoff
TINY = 2.0**-149  # smallest float32 subnormal


def _exact(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact (correctly rounded) column sums of squares, sums and sums of |x|."""
    x64 = x.astype(np.float64)
    sq = np.array([math.fsum(c) for c in (x64 * x64).T])
    s = np.array([math.fsum(c) for c in x64.T])
    a = np.array([math.fsum(c) for c in np.abs(x64).T])
    return sq, s, a


def _dense_bound(n: int, s2: np.ndarray, s1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rel = 17 * U + 2 * n * V
    return rel * s2 + n * TINY, rel * s1


def _adversarial(rng: np.random.Generator, n: int, cols: int) -> np.ndarray:
    """Magnitudes 1e-25..1e18 (squares from float32 subnormals to 1e36), random signs;
    the first row of every group of 16 is huge and the others tiny in half the columns."""
    exp = rng.uniform(-25, 18, size=(n, cols))
    x = (10.0**exp * rng.choice([-1.0, 1.0], size=(n, cols))).astype(np.float32)
    half = cols // 2
    x[:, :half] = np.where(
        (np.arange(n) % GROUP == 0)[:, None],
        np.float32(3e17),
        rng.uniform(0.5, 1.5, size=(n, half)).astype(np.float32),
    )
    return x


@pytest.mark.parametrize("n", [1, 15, 16, 17, 4096 + 7, 200_003])
def test_dense_sums_within_the_bound(n):
    rng = np.random.default_rng(n)
    x = _adversarial(rng, n, 8)
    sq, s = ColumnSums(1).dense(x)
    ex_sq, ex_s, ex_abs = _exact(x)
    b_sq, b_s = _dense_bound(n, ex_sq, ex_abs)
    assert np.all(np.abs(sq - ex_sq) <= b_sq), (np.abs(sq - ex_sq) / b_sq).max()
    assert np.all(np.abs(s - ex_s) <= b_s), (np.abs(s - ex_s) / b_s).max()


def test_dense_sums_of_cancelling_rows():
    """Sums whose exact value is far below their terms: the bound is relative to sum |x|."""
    rng = np.random.default_rng(7)
    n = 100_000
    big = rng.uniform(1e6, 1e7, size=(n // 2, 4)).astype(np.float32)
    x = np.empty((n, 4), dtype=np.float32)
    x[0::2], x[1::2] = big, -big
    x[::97] += np.float32(1e-3)
    sq, s = ColumnSums(1).dense(x)
    ex_sq, ex_s, ex_abs = _exact(x)
    b_sq, b_s = _dense_bound(n, ex_sq, ex_abs)
    assert np.all(np.abs(sq - ex_sq) <= b_sq)
    assert np.all(np.abs(s - ex_s) <= b_s)


def test_dense_error_does_not_grow_with_chunks():
    """A run of 64 calls (chunks) accumulated in float64, as the collector does, stays
    within the bound of its total rows."""
    rng = np.random.default_rng(3)
    chunks = [_adversarial(rng, 2048, 8) for _ in range(64)]
    summer = ColumnSums(1)
    acc_sq, acc_s = np.zeros(8), np.zeros(8)
    for c in chunks:
        sq, s = summer.dense(c)
        acc_sq += sq
        acc_s += s
    ex_sq, ex_s, ex_abs = _exact(np.concatenate(chunks))
    b_sq, b_s = _dense_bound(64 * 2048, ex_sq, ex_abs)
    assert np.all(np.abs(acc_sq - ex_sq) <= b_sq)
    assert np.all(np.abs(acc_s - ex_s) <= b_s)


def test_a_float32_running_sum_fails_the_bound():
    """The bound is tight enough to tell our sums from llama-imatrix's kind of float32
    accumulator (one float32 running sum per column)."""
    rng = np.random.default_rng(11)
    n = 200_000
    # one value per column: the float32 running sum's rounding errors do not cancel
    x = np.tile(rng.uniform(0.5, 1.5, size=8).astype(np.float32), (n, 1))
    running = np.cumsum(np.square(x), axis=0, dtype=np.float32)[-1].astype(np.float64)
    ex_sq, _, ex_abs = _exact(x)
    bound, _ = _dense_bound(n, ex_sq, ex_abs)
    assert np.all(np.abs(running - ex_sq) > bound)


def test_grouped_sums_within_the_float64_bound():
    """Expert inputs: rows gathered per expert, summed in float64."""
    rng = np.random.default_rng(5)
    n_rows, cols = 50_000, 6
    x = _adversarial(rng, n_rows, cols)
    experts = rng.integers(0, 4, size=3 * n_rows)
    src = rng.integers(0, n_rows, size=experts.size)
    order = np.argsort(experts, kind="stable")
    sorted_e = experts[order]
    starts = np.flatnonzero(np.r_[True, sorted_e[1:] != sorted_e[:-1]])
    sq, s = ColumnSums(1).grouped(x, src[order], starts)
    for k, e in enumerate(sorted_e[starts]):
        rows = x[src[experts == e]]
        ex_sq, ex_s, ex_abs = _exact(rows)
        rel = 2 * rows.shape[0] * V
        assert np.all(np.abs(sq[k] - ex_sq) <= rel * ex_sq)
        assert np.all(np.abs(s[k] - ex_s) <= rel * ex_abs)


def test_threads_do_not_change_the_sums():
    rng = np.random.default_rng(9)
    x = _adversarial(rng, 2000, 1024)
    one = ColumnSums(1)
    two = ColumnSums(2)
    try:
        for a, b in zip(one.dense(x), two.dense(x), strict=True):
            np.testing.assert_array_equal(a, b)
        rows = rng.integers(0, 2000, size=3000)
        starts = np.array([0, 1000, 2500])
        for a, b in zip(one.grouped(x, rows, starts), two.grouped(x, rows, starts), strict=True):
            np.testing.assert_array_equal(a, b)
    finally:
        two.close()


@pytest.mark.parametrize("threads", [1, 2])
def test_without_plain_sums_the_squares_are_the_same(threads):
    """``with_sums=False`` (an output without ``in_sum``) leaves the plain sums out and
    changes no square sum, dense or grouped, on one thread or two; the remainder rows
    (not a multiple of :data:`GROUP`) take the float64 path."""
    rng = np.random.default_rng(13)
    x = _adversarial(rng, 2000 + GROUP // 2, 1024)
    rows = rng.integers(0, x.shape[0], size=3000)
    starts = np.array([0, 1000, 2500])
    both, squares = ColumnSums(threads), ColumnSums(threads, with_sums=False)
    try:
        for full, part in (
            (both.dense(x), squares.dense(x)),
            (both.grouped(x, rows, starts), squares.grouped(x, rows, starts)),
        ):
            np.testing.assert_array_equal(part[0], full[0])
            assert part[1] is None and full[1] is not None
    finally:
        both.close()
        squares.close()
