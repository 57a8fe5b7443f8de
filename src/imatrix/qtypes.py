"""The names llama-quantize accepts: file types (``Q4_K_M``) and tensor types (``q6_K``).

Why a table of our own: the workflow validates its config (and records which types
cannot be made without an imatrix) before any job starts, without loading llama.cpp;
and a wrong name must fail with one clear message instead of llama.cpp's usage dump
or, for a tensor type llama.cpp cannot quantize to, an abort that kills the process.
The tables follow the pinned llama.cpp (tools/quantize/quantize.cpp ``QUANT_OPTIONS``,
src/llama-quant.cpp; the ggml type ids and names come from :mod:`imatrix.constants`);
tests check them against the library and against the real llama-quantize.
"""

from __future__ import annotations

from imatrix.constants import (
    GGML_TYPE_COUNT as GGML_TYPE_COUNT,
)
from imatrix.constants import GGML_TYPE_Q2_0, GGMLQuantizationType, ggml_type_name
from imatrix.errors import ImatrixError

#: llama-quantize's type names (``QUANT_OPTIONS``, same order) -> ``llama_ftype``.
#: ``Q3_K``/``Q4_K``/``Q5_K`` are its aliases of the ``_M`` mixes; ``COPY`` copies tensors
#: unchanged (ftype 0 with ``only_copy``).
QUANT_TYPES: dict[str, int] = {
    "Q1_0": 40,
    "Q2_0": 41,
    "Q4_0": 2,
    "Q4_1": 3,
    "MXFP4_MOE": 38,
    "Q5_0": 8,
    "Q5_1": 9,
    "IQ2_XXS": 19,
    "IQ2_XS": 20,
    "IQ2_S": 28,
    "IQ2_M": 29,
    "IQ1_S": 24,
    "IQ1_M": 31,
    "TQ1_0": 36,
    "TQ2_0": 37,
    "Q2_K": 10,
    "Q2_K_S": 21,
    "IQ3_XXS": 23,
    "IQ3_S": 26,
    "IQ3_M": 27,
    "Q3_K": 12,
    "IQ3_XS": 22,
    "Q3_K_S": 11,
    "Q3_K_M": 12,
    "Q3_K_L": 13,
    "IQ4_NL": 25,
    "IQ4_XS": 30,
    "Q4_K": 15,
    "Q4_K_S": 14,
    "Q4_K_M": 15,
    "Q5_K": 17,
    "Q5_K_S": 16,
    "Q5_K_M": 17,
    "Q6_K": 18,
    "Q8_0": 7,
    "F16": 1,
    "BF16": 32,
    "F32": 0,
    "COPY": 0,
}

#: File types whose default mixture puts some tensors into a type that llama.cpp
#: refuses to make without importance data (``tensor_requires_imatrix`` in
#: src/llama-quant.cpp: IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, and Q2_K inside a
#: Q2_K_S file). IQ3_XS is here because its mixture sends attn_q/attn_k and the middle
#: layers' ffn_gate/ffn_up to IQ3_XXS; IQ2_S and IQ2_M because their base types are
#: IQ2_XS and IQ2_S. (``--pure`` or ``--tensor-type`` overrides can change this for a
#: given run; llama.cpp then decides, and we report its error.)
_REQUIRE_IMATRIX = frozenset(
    {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"}
)

_T = GGMLQuantizationType
#: ggml tensor types that ``ggml_quantize_chunk`` can produce (``ggml_type_name`` -> id),
#: i.e. the values ``--tensor-type``, ``--output-tensor-type`` and
#: ``--token-embedding-type`` may name. llama-quantize accepts any ggml type name here
#: and aborts the process on the others (i8, q8_K, ...); we refuse them up front.
GGML_TYPES: dict[str, int] = {
    ggml_type_name(int(t)): int(t)
    for t in (
        _T.F32,
        _T.F16,
        _T.Q4_0,
        _T.Q4_1,
        _T.Q5_0,
        _T.Q5_1,
        _T.Q8_0,
        _T.Q2_K,
        _T.Q3_K,
        _T.Q4_K,
        _T.Q5_K,
        _T.Q6_K,
        _T.IQ2_XXS,
        _T.IQ2_XS,
        _T.IQ3_XXS,
        _T.IQ1_S,
        _T.IQ4_NL,
        _T.IQ3_S,
        _T.IQ2_S,
        _T.IQ4_XS,
        _T.IQ1_M,
        _T.BF16,
        _T.TQ1_0,
        _T.TQ2_0,
        _T.MXFP4,
        _T.NVFP4,
        _T.Q1_0,
        GGML_TYPE_Q2_0,
    )
}
GGML_TYPE_NAMES: dict[int, str] = {v: k for k, v in GGML_TYPES.items()}

#: ggml types whose quantizer asserts (aborts) without importance data
#: (``ggml_quantize_requires_imatrix``), even for tensors llama.cpp does not check.
GGML_TYPES_ASSERT_IMATRIX = frozenset({int(_T.IQ2_XXS), int(_T.IQ2_XS), int(_T.IQ1_S)})


def parse_quant_type(name: str) -> tuple[str, int]:
    """``(canonical name, llama_ftype)`` for a llama-quantize type name or number.

    Case-insensitive like llama-quantize; a number selects the first name with that
    ftype (``15`` is ``Q4_K``, the alias listed before ``Q4_K_M``, as llama-quantize does).
    """
    text = str(name).strip()
    upper = text.upper()
    if upper in QUANT_TYPES:
        return upper, QUANT_TYPES[upper]
    if text.isdigit():
        for canon, ftype in QUANT_TYPES.items():
            if ftype == int(text):
                return canon, ftype
    raise ImatrixError(f"unknown quantization type '{name}' (allowed: {', '.join(QUANT_TYPES)})")


def requires_imatrix(name: str) -> bool:
    """True for types llama.cpp refuses to make without an imatrix (IQ2_XXS, IQ3_XXS, ...)."""
    canon, _ = parse_quant_type(name)
    return canon in _REQUIRE_IMATRIX


def parse_ggml_type(name: str, what: str = "tensor type") -> int:
    """The ggml type id for a tensor type name (case-insensitive: ``Q6_K``, ``q6_k``)."""
    low = str(name).strip().lower()
    for tname, tid in GGML_TYPES.items():
        if tname.lower() == low:
            return tid
    raise ImatrixError(f"invalid {what} '{name}' (allowed: {', '.join(GGML_TYPES)})")
