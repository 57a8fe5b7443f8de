"""Per-token negative log-likelihoods: ggml's vectorized sums of exponentials against
llama-imatrix's formula evaluated in float64, and against the numpy path."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from imatrix.ggml_vec import ggml_exp_sum, row_exp_sums
from imatrix.perplexity import _nll_rows_numpy, token_nll


def reference_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """llama-imatrix's log-softmax: float32 differences, exponentials summed in double."""
    d = logits - logits.max(axis=1, keepdims=True)
    picked = d[np.arange(len(targets)), targets].astype(np.float64)
    return np.log(np.exp(d.astype(np.float64)).sum(axis=1)) - picked


@pytest.fixture(params=[(37, 5003), (9, 262144)], ids=["odd-vocab", "gemma-vocab"])
def case(request: pytest.FixtureRequest) -> tuple[np.ndarray, np.ndarray]:
    n, v = request.param
    rng = np.random.default_rng(n)
    logits = (rng.standard_normal((n, v)) * rng.uniform(0.5, 8.0, (n, 1))).astype(np.float32)
    targets = rng.integers(0, v, n)
    targets[0] = int(np.argmax(logits[0]))  # a token at the maximum: picked is 0
    return logits, targets


def test_the_ggml_kernel_is_loaded() -> None:
    assert ggml_exp_sum() is not None


def test_nll_matches_the_formula_in_double(case: tuple[np.ndarray, np.ndarray]) -> None:
    logits, targets = case
    ref = reference_nll(logits, targets)
    np.testing.assert_allclose(token_nll(logits, targets), ref, rtol=1e-6, atol=1e-6)
    numpy_path = np.empty(len(targets))
    _nll_rows_numpy(logits, targets, numpy_path)
    np.testing.assert_allclose(numpy_path, ref, rtol=1e-6, atol=1e-6)


def test_threads_give_the_same_bytes(case: tuple[np.ndarray, np.ndarray]) -> None:
    logits, targets = case
    with ThreadPoolExecutor(2) as pool:
        split = token_nll(logits, targets, pool, 3)
    assert split.tobytes() == token_nll(logits, targets).tobytes()


def test_exp_sums_of_rows() -> None:
    exp_sum = ggml_exp_sum()
    assert exp_sum is not None
    rows = np.array([[0.0, -1.0, -2.0, 1.0, 3.0, -50.0, 2.5, 0.5, -0.25]], dtype=np.float32)
    got = row_exp_sums(exp_sum, rows, rows.max(axis=1))
    want = np.exp(rows.astype(np.float64) - 3.0).sum()
    assert got[0] == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="C-contiguous"):
        row_exp_sums(exp_sum, np.asfortranarray(np.ones((3, 4), np.float32)), np.ones(3))
