"""ggml's exported CPU vector kernel for sums of exponentials, bound with ctypes.

Why: perplexity needs ``sum(expf(logit - max))`` over every scored row of logits,
``n_vocab`` values each (262,144 for gemma 3). numpy's float32 ``exp`` runs a scalar
loop on many builds, and was most of the time the perplexity adds to a collection.
The CPU backend llama.cpp already loaded exports ``ggml_vec_soft_max_f32``, the
kernel behind its own softmax: it computes ``y = expf(x - max)`` with float32
differences, vectorized, and returns their sum in double precision (the same
formula llama-imatrix evaluates element by element). ctypes releases the GIL for
the call, so threads can score rows side by side.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable

import numpy as np

from imatrix.ggml import ggml_library

log = logging.getLogger(__name__)

#: ``sum = f(n, y, x, max)``: writes ``y[i] = expf(x[i] - max)`` for ``i < n`` and
#: returns ``sum(y)`` in double precision; ``y`` and ``x`` are float32 addresses
ExpSum = Callable[[int, int, int, float], float]

_SYMBOL = "ggml_vec_soft_max_f32"


@functools.lru_cache(maxsize=1)
def ggml_exp_sum() -> ExpSum | None:
    """ggml's ``ggml_vec_soft_max_f32``, or None when the loaded build has no CPU
    backend library exporting it (the caller then computes with numpy)."""
    import llama_cpp  # noqa: F401  (loads the ggml libraries this binds to)

    path = ggml_library("ggml-cpu")
    if path is None:  # pragma: no cover - a build without a separate CPU backend library
        log.debug("no ggml CPU library: exponentials summed with numpy")
        return None
    fn = getattr(ctypes.CDLL(str(path)), _SYMBOL, None)
    if fn is None:  # pragma: no cover - a ggml that does not export the kernel
        log.debug("%s does not export %s: exponentials summed with numpy", path.name, _SYMBOL)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float]
    fn.restype = ctypes.c_double
    return fn  # type: ignore[no-any-return]


def row_exp_sums(exp_sum: ExpSum, rows: np.ndarray, maxima: np.ndarray) -> np.ndarray:
    """``sum(expf(rows[i] - maxima[i]))`` of each row of a C-contiguous float32 matrix,
    in float64 (``maxima`` float32, one per row)."""
    if rows.dtype != np.float32 or not rows.flags.c_contiguous or rows.ndim != 2:
        raise ValueError("rows must be a C-contiguous 2-D float32 array")
    n, v = rows.shape
    scratch = np.empty(v, dtype=np.float32)
    y, base, stride = scratch.ctypes.data, rows.ctypes.data, rows.strides[0]
    return np.fromiter(
        (exp_sum(v, y, base + i * stride, float(maxima[i])) for i in range(n)),
        dtype=np.float64,
        count=n,
    )


__all__ = ["ExpSum", "ggml_exp_sum", "row_exp_sums"]
