"""The base model as the planner sees it: metadata byte sizes, tensor shapes, row data.

Why not gguf-py's ``GGUFReader``: it builds a numpy view per vocabulary string, which
takes minutes on a 262k-token vocabulary, longer than a plan from the cache may take.
The project's own reader (:func:`imatrix.gguf_io.read_gguf`) parses the header in a
second or two; from its values the byte size of every key-value pair follows (the
planner needs those to predict the output's header), and the start of the data
section is the header's size padded to the alignment, checked against the file size.
Tensor data is read through a read-only memory map, only the rows that are sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imatrix.constants import GGML_TYPE_SIZES, GGUFValueType
from imatrix.errors import ImatrixError
from imatrix.gguf_io import KV, TensorInfo, read_gguf

_HEADER = 4 + 4 + 8 + 8  # magic, version, tensor count, kv count
_SCALAR_SIZE = {
    GGUFValueType.UINT8: 1,
    GGUFValueType.INT8: 1,
    GGUFValueType.UINT16: 2,
    GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4,
    GGUFValueType.INT32: 4,
    GGUFValueType.FLOAT32: 4,
    GGUFValueType.BOOL: 1,
    GGUFValueType.UINT64: 8,
    GGUFValueType.INT64: 8,
    GGUFValueType.FLOAT64: 8,
}


def string_bytes(s: str | bytes) -> int:
    """A GGUF string: u64 length plus the bytes."""
    return 8 + len(s.encode("utf-8") if isinstance(s, str) else s)


def value_bytes(kv: KV) -> int:
    """Bytes of a value as GGUF stores it (after its u32 type)."""
    if kv.type == GGUFValueType.STRING:
        return string_bytes(kv.value)
    if kv.type == GGUFValueType.ARRAY:
        assert kv.elem_type is not None
        if kv.elem_type == GGUFValueType.STRING:
            return 4 + 8 + sum(string_bytes(s) for s in kv.value)
        return 4 + 8 + len(kv.value) * _SCALAR_SIZE[kv.elem_type]
    return _SCALAR_SIZE[kv.type]


def kv_bytes(key: str, value: int) -> int:
    """A key-value pair: the key string, the u32 type, then ``value`` bytes."""
    return string_bytes(key) + 4 + value


def info_bytes(name: str, n_dims: int) -> int:
    """A tensor-info entry: name, u32 dims, i64 per dim, u32 type, u64 offset."""
    return string_bytes(name) + 4 + 8 * n_dims + 4 + 8


def tensor_nbytes(t: TensorInfo) -> int:
    block, size = GGML_TYPE_SIZES[int(t.type)]
    return t.n_elements // block * size


@dataclass
class ModelFile:
    """Parsed header of the base model plus where its data section starts."""

    path: str
    kv: dict[str, KV]
    tensors: list[TensorInfo]
    alignment: int
    data_start: int

    def raw(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes (a read-only memory map)."""
        return np.memmap(
            self.path,
            dtype=np.uint8,
            mode="r",
            offset=self.data_start + t.offset,
            shape=(tensor_nbytes(t),),
        )


def open_model(path: str) -> ModelFile:
    """Read the header of ``path`` and locate its data section."""
    g = read_gguf(path, load_data=False)
    head = _HEADER + sum(kv_bytes(k, value_bytes(v)) for k, v in g.kv.items())
    head += sum(info_bytes(t.name, len(t.ne)) for t in g.tensors)
    start = head + (-head) % g.alignment
    end = max((start + t.offset + tensor_nbytes(t) for t in g.tensors), default=start)
    size = Path(path).stat().st_size
    if not end <= size < end + g.alignment:
        raise ImatrixError(
            f"{path}: data section does not end where the header says ({end} vs {size} bytes)"
        )
    return ModelFile(path, g.kv, g.tensors, g.alignment, start)
