"""The size of the file llama-quantize writes, to the byte, before writing it.

Why computed rather than measured: the budget must hold for the exact file, and
quantizing a model once per candidate recipe would take longer than the plan.
llama-quantize writes (src/llama-quant.cpp, ggml/src/gguf.cpp): the GGUF header (24
bytes); the input's key-value pairs (copied with the same types, the split keys
removed), ``general.quantization_version`` and ``general.file_type`` (u32), then the
``--override-kv`` entries and the four ``quantize.imatrix.*`` entries (strings cut at
127 bytes, ints as u32), each replacing a key of the same name; one tensor-info entry
per tensor (name, ``ggml_n_dims`` dimensions, type, offset); padding to the
alignment (32); then each tensor's data, padded to the alignment. None of the
metadata depends on the tensors' types (a type is a fixed-size field), so the size is
a constant plus the sum of the padded tensor sizes: the invocation (how the imatrix
path is spelled) changes the constant, which is why the recipe records it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from imatrix.constants import GGUF_DEFAULT_ALIGNMENT, KEY_GENERAL_ALIGNMENT, GGMLQuantizationType
from imatrix.errors import ImatrixError
from imatrix.plan_gguf import (
    ModelFile,
    info_bytes,
    kv_bytes,
    string_bytes,
    tensor_nbytes,
    value_bytes,
)
from imatrix.plan_tensors import PlanTensor, n_dims, tensor_bytes
from imatrix.quantize import KV_BOOL, KV_FLOAT, KV_INT, KVOverride

_HEADER = 4 + 4 + 8 + 8  # magic, version, tensor count, kv count
_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
_KEY_QNT_VERSION = "general.quantization_version"
_KEY_FILE_TYPE = "general.file_type"
_U32 = 4


def pad(n: int, align: int = GGUF_DEFAULT_ALIGNMENT) -> int:
    """``GGML_PAD``."""
    return (n + align - 1) // align * align


def _override_value_bytes(kv: KVOverride) -> int:
    if kv.tag in (KV_INT, KV_FLOAT):
        return _U32  # ints become u32 (gguf_set_val_u32), floats f32
    if kv.tag == KV_BOOL:
        return 1
    assert isinstance(kv.value, bytes)
    return string_bytes(kv.value)


def meta_size(model: ModelFile, overrides: Sequence[KVOverride]) -> int:
    """Bytes before the first tensor's data in llama-quantize's output."""
    if model.alignment != GGUF_DEFAULT_ALIGNMENT or KEY_GENERAL_ALIGNMENT in model.kv:
        raise ImatrixError(
            f"{model.path}: sets {KEY_GENERAL_ALIGNMENT}; llama-quantize's output size "
            "cannot be predicted for it"
        )
    kvs = {k: kv_bytes(k, value_bytes(v)) for k, v in model.kv.items()}
    for key in _SPLIT_KEYS:
        kvs.pop(key, None)
    kvs[_KEY_QNT_VERSION] = kv_bytes(_KEY_QNT_VERSION, _U32)
    kvs[_KEY_FILE_TYPE] = kv_bytes(_KEY_FILE_TYPE, _U32)
    for kv in overrides:
        kvs[kv.key] = kv_bytes(kv.key, _override_value_bytes(kv))
    infos = sum(info_bytes(t.name, n_dims(t.ne)) for t in model.tensors)
    return pad(_HEADER + sum(kvs.values()) + infos)


@dataclass(frozen=True)
class SizeModel:
    """File size = ``meta`` + ``fixed`` (tensors the plan leaves alone) + the planned
    tensors' padded data."""

    meta: int
    fixed: int

    def file_size(self, tensors: Sequence[PlanTensor], types: Mapping[str, int]) -> int:
        return self.meta + self.fixed + sum(padded_bytes(t, types[t.name]) for t in tensors)


def padded_bytes(t: PlanTensor, qtype: int) -> int:
    """A planned tensor's bytes in the file, padding included."""
    return pad(tensor_bytes(t, GGMLQuantizationType(qtype)))


def size_model(
    model: ModelFile, planned: Sequence[PlanTensor], overrides: Sequence[KVOverride]
) -> SizeModel:
    """The size model of quantizing ``model`` with these overrides."""
    names = {t.name for t in planned}
    fixed = sum(pad(tensor_nbytes(t)) for t in model.tensors if t.name not in names)
    return SizeModel(meta_size(model, overrides), fixed)
