"""Per tensor and candidate type: the error quantization would make, with ggml's kernels.

Why ggml's own quantizers (``ggml_quantize_chunk``, and the type traits' ``to_float``
to dequantize) through ctypes: they are what llama-quantize runs, with the imatrix
means as quant weights, so a sampled row's error here is exactly the error that row
will have in the file. The error is the importance-weighted squared error
``sum_j w_j (x_j - q_j)^2`` that the quantizers minimize (w = the imatrix means of
the row's expert); tensors without imatrix data (``token_embd``) are quantized without
weights, as llama-quantize does, and their error is unweighted. Large tensors are
estimated from a deterministic, evenly spaced subsample of rows, scaled up to the
whole tensor; ctypes releases the GIL, so tensors run in parallel threads.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from imatrix.constants import GGMLQuantizationType
from imatrix.plan_gguf import ModelFile
from imatrix.plan_tensors import PlanTensor, row_bytes

log = logging.getLogger(__name__)

#: default cap of sampled elements per tensor (rows are whole)
DEFAULT_SAMPLE_ELEMENTS = 1 << 18

_FloatP = ctypes.POINTER(ctypes.c_float)
_ToFloat = ctypes.CFUNCTYPE(None, ctypes.c_void_p, _FloatP, ctypes.c_int64)


class _Traits(ctypes.Structure):
    """``struct ggml_type_traits`` (ggml.h)."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


@dataclass(frozen=True)
class _Kernels:
    quantize_chunk: Any  # ctypes function pointers
    traits: Any


@functools.lru_cache(maxsize=1)
def _kernels() -> _Kernels:
    """Prototypes on the ggml-base handle the project already loaded (:mod:`imatrix.ggml`)."""
    from imatrix.ggml import libggml_base

    lib = libggml_base()
    qproto = ctypes.CFUNCTYPE(
        ctypes.c_size_t,
        ctypes.c_int,
        _FloatP,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        _FloatP,
    )
    tproto = ctypes.CFUNCTYPE(ctypes.POINTER(_Traits), ctypes.c_int)
    return _Kernels(qproto(("ggml_quantize_chunk", lib)), tproto(("ggml_get_type_traits", lib)))


def quantize_rows(qtype: int, rows: np.ndarray, weights: np.ndarray | None) -> bytes:
    """``ggml_quantize_chunk`` of float32 rows (all with the same quant weights)."""
    k = _kernels()
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n, n_per_row = rows.shape
    out = np.empty(n * row_bytes(GGMLQuantizationType(qtype), n_per_row), dtype=np.uint8)
    w = None
    if weights is not None:
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        w = weights.ctypes.data_as(_FloatP)
    k.quantize_chunk(qtype, rows.ctypes.data_as(_FloatP), out.ctypes.data, 0, n, n_per_row, w)
    return out.tobytes()


def dequantize(qtype: int, data: bytes, n_elements: int) -> np.ndarray:
    """The type traits' ``to_float``: what inference reads back."""
    traits = _kernels().traits(qtype).contents
    if not traits.to_float:
        raise ValueError(f"ggml type {qtype} has no to_float")
    out = np.empty(n_elements, dtype=np.float32)
    buf = ctypes.create_string_buffer(data, len(data))
    _ToFloat(traits.to_float)(ctypes.addressof(buf), out.ctypes.data_as(_FloatP), n_elements)
    return out


def sample_rows(n_rows: int, n_per_row: int, max_elements: int) -> np.ndarray:
    """Evenly spaced row indices, at most ``max_elements`` elements (at least one row)."""
    n = max(1, min(n_rows, max_elements // max(1, n_per_row)))
    if n >= n_rows:
        return np.arange(n_rows, dtype=np.int64)
    return np.unique(np.round(np.linspace(0, n_rows - 1, n)).astype(np.int64))


def read_rows(model: ModelFile, t: PlanTensor, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of the tensor (rows of all experts counted in order) as float32."""
    info = next(i for i in model.tensors if i.name == t.name)
    raw_all = model.raw(info)
    if t.src_type == GGMLQuantizationType.BF16:
        raw = raw_all.view(np.uint16).reshape(-1, t.n_per_row)[idx]
        out: np.ndarray = (raw.astype(np.uint32) << 16).view(np.float32)
        return out
    dtype = np.float16 if t.src_type == GGMLQuantizationType.F16 else np.float32
    rows: np.ndarray = raw_all.view(dtype).reshape(-1, t.n_per_row)[idx].astype(np.float32)
    return rows


def row_error(
    qtype: int, rows: np.ndarray, experts: np.ndarray, weights: np.ndarray | None
) -> float:
    """Sum of the (weighted) squared errors of quantizing ``rows`` to ``qtype``; rows
    of expert e use ``weights[e]`` as quant weights."""
    total = 0.0
    for e in np.unique(experts):
        sel = rows[experts == e]
        w = None if weights is None else weights[e]
        q = dequantize(qtype, quantize_rows(qtype, sel, w), sel.size).reshape(sel.shape)
        d = (sel.astype(np.float64) - q) ** 2
        total += float((d * w).sum() if w is not None else d.sum())
    return total


def tensor_errors(
    model: ModelFile,
    t: PlanTensor,
    types: Sequence[int],
    means: np.ndarray | None,
    max_elements: int,
) -> dict[int, float]:
    """Estimated error of the whole tensor in each type (sample error x rows / sampled)."""
    idx = sample_rows(t.n_rows, t.n_per_row, max_elements)
    rows = read_rows(model, t, idx)
    rows_per_expert = t.ne[1]
    experts = idx // rows_per_expert
    weights = None if means is None else means.reshape(-1, t.n_per_row)
    scale = t.n_rows / idx.size
    return {q: row_error(q, rows, experts, weights) * scale for q in types}


def all_errors(
    tensors: Sequence[PlanTensor],
    model: ModelFile,
    types: Mapping[str, Sequence[int]],
    means: Mapping[str, np.ndarray],
    max_elements: int = DEFAULT_SAMPLE_ELEMENTS,
    jobs: int = 1,
) -> dict[str, dict[int, float]]:
    """Errors of every tensor in each of its types, ``jobs`` tensors at a time."""
    from tqdm import tqdm

    def one(t: PlanTensor) -> dict[int, float]:
        m = means.get(t.name) if t.has_imatrix else None
        return tensor_errors(model, t, types[t.name], m, max_elements)

    # biggest first, so the threads finish together
    order = sorted(tensors, key=lambda t: (-t.n_rows * t.n_per_row, t.name))
    out: dict[str, dict[int, float]] = {}
    with ThreadPoolExecutor(max(1, jobs)) as ex:
        bar = tqdm(total=len(order), desc="plan: error estimates", unit="tensor", disable=None)
        for t, res in zip(order, ex.map(one, order), strict=True):
            out[t.name] = res
            bar.update()
        bar.close()
    return out
