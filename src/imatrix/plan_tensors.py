"""Which tensors a plan assigns types to, and which types each of them may take.

Why a port of llama.cpp's rules instead of asking it: the planner must know, before
anything is quantized, exactly which tensors llama-quantize will touch
(``tensor_allows_quantization`` in src/llama-quant.cpp: 2-D and 3-D tensors whose
name ends in ``weight``, except norms, the expert router ``ffn_gate_inp`` and a list
of small special tensors), and which types survive its fallback rule: llama.cpp
applies a ``--tensor-type`` override first and *then* replaces a type whose block
size does not divide the row length (``tensor_type_fallback``), so a candidate that
does not divide would silently become another type. Type facts (block size, bytes
per block) come from ``imatrix.constants.GGML_TYPE_SIZES`` (gguf-py's table, checked against libggml).
"""

from __future__ import annotations

from dataclasses import dataclass

from imatrix.constants import GGML_TYPE_SIZES, GGMLQuantizationType
from imatrix.errors import ImatrixError

#: llama-quantize's default candidate types of the planner (issue 12).
DEFAULT_CANDIDATES: tuple[str, ...] = (
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "IQ2_XXS",
    "IQ2_XS",
    "IQ2_S",
    "IQ3_XXS",
    "IQ3_S",
    "IQ4_XS",
    "IQ4_NL",
)

#: substrings that exclude a tensor from quantization (tensor_allows_quantization)
_NEVER_QUANTIZED = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)
_NEVER_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")

#: ggml types whose quantizer asserts without importance data, plus those llama.cpp
#: refuses to make without it (ggml_quantize_requires_imatrix, tensor_requires_imatrix)
NEED_IMATRIX = frozenset(
    {
        GGMLQuantizationType.IQ2_XXS,
        GGMLQuantizationType.IQ2_XS,
        GGMLQuantizationType.IQ2_S,
        GGMLQuantizationType.IQ3_XXS,
        GGMLQuantizationType.IQ1_S,
        GGMLQuantizationType.IQ1_M,
    }
)

#: tensor groups (one calibrated sensitivity each), matched in this order by substring
_GROUPS = (
    ("attn_qkv", "attn_qkv"),
    ("attn_kv_b", "attn_kv_b"),
    ("attn_v", "attn_v."),
    ("attn_k", "attn_k."),
    ("attn_q", "attn_q."),
    ("attn_output", "attn_output"),
    ("ffn_up", "ffn_up"),
    ("ffn_gate", "ffn_gate"),
    ("ffn_down", "ffn_down"),
)

#: source types whose rows the planner can read as floats
SOURCE_TYPES = frozenset(
    {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
)


@dataclass(frozen=True)
class PlanTensor:
    """One tensor llama-quantize will quantize."""

    name: str
    ne: tuple[int, ...]
    src_type: GGMLQuantizationType
    group: str
    has_imatrix: bool

    @property
    def n_per_row(self) -> int:
        return self.ne[0]

    @property
    def n_rows(self) -> int:
        n = 1
        for d in self.ne[1:]:
            n *= d
        return n


def n_dims(ne: tuple[int, ...]) -> int:
    """``ggml_n_dims``: index of the last dimension above 1, plus one (at least 1)."""
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def allows_quantization(name: str, ne: tuple[int, ...]) -> bool:
    """llama.cpp's ``tensor_allows_quantization`` with default parameters."""
    if n_dims(ne) < 2 or not name.endswith("weight"):
        return False
    if name in _NEVER_QUANTIZED_NAMES:
        return False
    return not any(s in name for s in _NEVER_QUANTIZED)


def tensor_group(name: str) -> str:
    """The calibration group of a tensor: its role (attn_q, ffn_down, ...)."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    if name == "output.weight":
        return "output"
    for group, sub in _GROUPS:
        if sub in name:
            return group
    return "other"


def type_of(name: str) -> GGMLQuantizationType:
    """A ggml tensor type by name, case-insensitive (``q4_K``, ``Q4_K``)."""
    try:
        return GGMLQuantizationType[name.strip().upper()]
    except KeyError:
        raise ImatrixError(f"unknown tensor type '{name}'") from None


def type_name(t: GGMLQuantizationType) -> str:
    """The spelling recipes use (gguf-py's upper-case name, e.g. ``Q4_K``)."""
    return t.name


def fits(t: PlanTensor, qtype: GGMLQuantizationType) -> bool:
    """True when llama.cpp keeps ``qtype`` for this tensor (no fallback)."""
    block, _ = GGML_TYPE_SIZES[int(qtype)]
    return t.n_per_row % block == 0


def eligible(t: PlanTensor, qtype: GGMLQuantizationType) -> bool:
    """A candidate type for this tensor: it fits the rows and, where llama.cpp or ggml
    demand importance data, the imatrix has an entry for the tensor."""
    if not fits(t, qtype):
        return False
    return t.has_imatrix or qtype not in NEED_IMATRIX


def row_bytes(qtype: GGMLQuantizationType, n_per_row: int) -> int:
    """``ggml_row_size``."""
    block, size = GGML_TYPE_SIZES[int(qtype)]
    return n_per_row // block * size


def tensor_bytes(t: PlanTensor, qtype: GGMLQuantizationType) -> int:
    """Bytes of the tensor's data in ``qtype`` (before alignment padding)."""
    return t.n_rows * row_bytes(qtype, t.n_per_row)
