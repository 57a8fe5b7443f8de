"""Column sums of activations on any array module: NumPy on the host, CuPy on a GPU.

Why one function generic over the array module ``xp``: on a GPU the sums are computed
where the activations already are (:mod:`imatrix.collect.device`) and only the result
vectors cross the bus; the arithmetic itself must still be testable on a machine
without a GPU. So it is written once, against the NumPy API subset CuPy implements,
and the tests run it with ``xp = numpy`` against the host path
(:mod:`imatrix.activations`).

Arithmetic (float64 throughout; ``v = 2**-53`` is the float64 unit roundoff, ``n``
the rows summed in one call, ``S2 = sum x_i**2`` and ``S1 = sum |x_i|`` of a column,
computed exactly):

- every activation is converted to float64 (exact), every square is formed in float64
  (exact: a float32 square needs 48 bits of mantissa);
- :func:`dense_sums` adds the rows with ``sum`` over axis 0 of row-major blocks of
  rows, then the block sums: ``|sum of squares - S2| <= (n - 1) v S2`` and
  ``|sum - sum x_i| <= (n - 1) v S1`` (the bound of any order of ``n - 1`` additions);
- :func:`expert_sums` forms per-expert sums as a float64 matrix product of a routing
  matrix (integer entries: how often each row goes to each expert) with the rows: the
  same bounds, ``n`` being the rows of the matrix product.

The blocks (:data:`BLOCK_BYTES` of float64 rows) bound the scratch memory taken on
the GPU next to llama.cpp's buffers. Both are far inside llama-imatrix's own float32 error (the parity limit is 1e-4
relative per element) and inside the host path's bound.

Determinism: no step uses atomics whose order could vary. NumPy's reductions and
CuPy's reduction kernels (and CUB's, when CuPy routes a reduction to it) add in an
order fixed by the shape and the device; cuBLAS's matrix products give bitwise equal
results run to run on the same GPU model. The result therefore depends only on the
data, the shapes (i.e. the batch settings), :data:`BLOCK_BYTES` and the device, so a resumed or sharded
run reproduces the uninterrupted run's bytes on the same GPU. Counts are integers.
"""

from __future__ import annotations

from typing import Any

from imatrix.constants import GGMLQuantizationType

#: an array module: ``numpy`` or ``cupy`` (CuPy ships no type information)
ArrayModule = Any
#: an array of that module
Array = Any

#: float64 scratch per block of rows (two such arrays live at a time)
BLOCK_BYTES = 64 << 20

_F16 = int(GGMLQuantizationType.F16)
_BF16 = int(GGMLQuantizationType.BF16)
#: bits a bfloat16 sits above in the float32 with the same value
_BF16_SHIFT = 16


def as_float32(xp: ArrayModule, raw: Array, ggml_type: int) -> Array:
    """The activations as float32: ``raw`` holds F32 values, F16 values (as float16) or
    BF16 values (as their uint16 bit patterns, which NumPy has no type for)."""
    if ggml_type == _F16:
        return raw.astype(xp.float32)
    if ggml_type == _BF16:
        return (raw.astype(xp.uint32) << _BF16_SHIFT).view(xp.float32)
    return raw


def row_blocks(n_rows: int, n_cols: int) -> list[slice]:
    """Consecutive row ranges of at most :data:`BLOCK_BYTES` as float64 (at least one row)."""
    step = max(1, BLOCK_BYTES // (8 * max(n_cols, 1)))
    return [slice(i, min(i + step, n_rows)) for i in range(0, max(n_rows, 1), step)]


def dense_sums(xp: ArrayModule, x: Array) -> Array:
    """``[2, cols]`` float64: per column of the 2-D ``[rows, cols]`` array ``x``, the sum
    of squares (row 0) and the sum (row 1)."""
    out = None
    for b in row_blocks(*x.shape):
        x64 = x[b].astype(xp.float64)
        part = xp.stack([xp.sum(x64 * x64, axis=0), xp.sum(x64, axis=0)])
        out = part if out is None else out + part
    return out


def routing(xp: ArrayModule, ids: Array, ne11: int, n_as: int) -> tuple[Array, Array]:
    """The routing matrix ``[n_as, n_tokens * ne11]`` (float64: how often each row of the
    activations goes to each expert) and the tokens per expert ``[n_as]`` (int64).

    ``ids`` is ``[n_tokens, n_ids]``: the experts chosen per token. Row ``t * ne11 + s %
    ne11`` holds token ``t``'s input for slot ``s``, as in llama-imatrix (``ne11`` is 1
    when all slots share the token's row). Ids outside ``0..n_as-1`` are not counted:
    the caller compares the counts' total with ``ids.size``."""
    n_tokens, n_ids = ids.shape
    hit = ids[None, :, :] == xp.arange(n_as, dtype=ids.dtype)[:, None, None]
    counts = hit.sum(axis=(1, 2), dtype=xp.int64)
    if n_ids % ne11 == 0:
        folded = hit.reshape(n_as, n_tokens, n_ids // ne11, ne11)
        w = folded.sum(axis=2, dtype=xp.float64)
    else:  # slots wrap around the rows unevenly: add them one by one (exact: integers)
        w = xp.zeros((n_as, n_tokens, ne11), dtype=xp.float64)
        for s in range(n_ids):
            w[:, :, s % ne11] += hit[:, :, s]
    return w.reshape(n_as, n_tokens * ne11), counts


def expert_sums(xp: ArrayModule, x: Array, ids: Array, ne11: int, n_as: int) -> tuple[Array, Array]:
    """Per expert, the column sums of the rows routed to it.

    ``x``: ``[n_tokens * ne11, cols]`` activation rows; ``ids``: ``[n_tokens, n_ids]``.
    Returns the tokens per expert ``[n_as]`` (int64) and ``[2, n_as, cols]`` float64:
    sums of squares, then sums."""
    w, counts = routing(xp, ids, ne11, n_as)
    out = None
    for b in row_blocks(*x.shape):
        x64 = x[b].astype(xp.float64)
        part = xp.stack([xp.matmul(w[:, b], x64 * x64), xp.matmul(w[:, b], x64)])
        out = part if out is None else out + part
    return counts, out


__all__ = [
    "BLOCK_BYTES",
    "Array",
    "ArrayModule",
    "as_float32",
    "dense_sums",
    "expert_sums",
    "routing",
    "row_blocks",
]
