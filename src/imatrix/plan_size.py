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

from gguf import GGUFReader, GGUFValueType

from imatrix.constants import GGUF_DEFAULT_ALIGNMENT, KEY_GENERAL_ALIGNMENT
from imatrix.errors import ImatrixError
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


def _kv_bytes(key: str, value_bytes: int) -> int:
    return 8 + len(key.encode("utf-8")) + 4 + value_bytes


def _override_value_bytes(kv: KVOverride) -> int:
    if kv.tag in (KV_INT, KV_FLOAT):
        return _U32  # ints become u32 (gguf_set_val_u32), floats f32
    if kv.tag == KV_BOOL:
        return 1
    assert isinstance(kv.value, bytes)
    return 8 + len(kv.value)


def _input_kvs(reader: GGUFReader, path: str) -> dict[str, int]:
    """Bytes of each input key-value pair as stored (llama.cpp copies them as they are)."""
    out: dict[str, int] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        if name == KEY_GENERAL_ALIGNMENT:
            value = int(field.parts[field.data[0]][0])
            if field.types[0] != GGUFValueType.UINT32 or value != GGUF_DEFAULT_ALIGNMENT:
                raise ImatrixError(
                    f"{path}: alignment {value} is not llama.cpp's default "
                    f"{GGUF_DEFAULT_ALIGNMENT}; its quantized size cannot be predicted"
                )
        out[name] = sum(int(p.nbytes) for p in field.parts)
    return out


def meta_size(reader: GGUFReader, path: str, overrides: Sequence[KVOverride]) -> int:
    """Bytes before the first tensor's data in llama-quantize's output."""
    kvs = _input_kvs(reader, path)
    for key in _SPLIT_KEYS:
        kvs.pop(key, None)
    kvs[_KEY_QNT_VERSION] = _kv_bytes(_KEY_QNT_VERSION, _U32)
    kvs[_KEY_FILE_TYPE] = _kv_bytes(_KEY_FILE_TYPE, _U32)
    for kv in overrides:
        kvs[kv.key] = _kv_bytes(kv.key, _override_value_bytes(kv))
    infos = 0
    for t in reader.tensors:
        ne = tuple(int(d) for d in t.shape)
        infos += 8 + len(t.name.encode("utf-8")) + 4 + 8 * n_dims(ne) + 4 + 8
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
    from gguf import GGMLQuantizationType

    return pad(tensor_bytes(t, GGMLQuantizationType(qtype)))


def size_model(
    reader: GGUFReader, path: str, planned: Sequence[PlanTensor], overrides: Sequence[KVOverride]
) -> SizeModel:
    """The size model of quantizing the file ``reader`` reads, with these overrides."""
    names = {t.name for t in planned}
    fixed = sum(pad(int(t.n_bytes)) for t in reader.tensors if t.name not in names)
    return SizeModel(meta_size(reader, path, overrides), fixed)
