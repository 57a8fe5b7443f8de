"""The names llama-quantize accepts: file types (``Q4_K_M``) and tensor types (``q6_K``).

Why a table of our own: the workflow validates its config (and records which types
cannot be made without an imatrix) before any job starts, without loading llama.cpp;
and a wrong name must fail with one clear message instead of llama.cpp's usage dump
or, for a tensor type llama.cpp cannot quantize to, an abort that kills the process.
The tables follow the pinned llama.cpp (tools/quantize/quantize.cpp ``QUANT_OPTIONS``,
ggml.h ``enum ggml_type``, src/llama-quant.cpp); tests check them against the library
and against the real llama-quantize.
"""

from __future__ import annotations

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

#: ggml tensor types that ``ggml_quantize_chunk`` can produce (``ggml_type_name`` -> id),
#: i.e. the values ``--tensor-type``, ``--output-tensor-type`` and
#: ``--token-embedding-type`` may name. llama-quantize accepts any ggml type name here
#: and aborts the process on the others (i8, q8_K, ...); we refuse them up front.
GGML_TYPES: dict[str, int] = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 6,
    "q5_1": 7,
    "q8_0": 8,
    "q2_K": 10,
    "q3_K": 11,
    "q4_K": 12,
    "q5_K": 13,
    "q6_K": 14,
    "iq2_xxs": 16,
    "iq2_xs": 17,
    "iq3_xxs": 18,
    "iq1_s": 19,
    "iq4_nl": 20,
    "iq3_s": 21,
    "iq2_s": 22,
    "iq4_xs": 23,
    "iq1_m": 29,
    "bf16": 30,
    "tq1_0": 34,
    "tq2_0": 35,
    "mxfp4": 39,
    "nvfp4": 40,
    "q1_0": 41,
    "q2_0": 42,
}
GGML_TYPE_NAMES: dict[int, str] = {v: k for k, v in GGML_TYPES.items()}
#: ``GGML_TYPE_COUNT``: "no override" in ``llama_model_quantize_params``.
GGML_TYPE_COUNT = 43

#: ggml types whose quantizer asserts (aborts) without importance data
#: (``ggml_quantize_requires_imatrix``), even for tensors llama.cpp does not check.
GGML_TYPES_ASSERT_IMATRIX = frozenset({16, 17, 19})


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
