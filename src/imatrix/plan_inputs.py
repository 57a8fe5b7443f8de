"""What a plan chooses from: the model's quantizable tensors and each one's candidate types.

Why separate from the orchestration in :mod:`imatrix.plan`: these are the checks that
turn user input into the problem (candidate names into ggml types, the imatrix matched
against the model's tensors, the per-tensor options including the stock mix's type),
and each failure here is a user error that must be reported before any slow work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from imatrix.constants import GGMLQuantizationType
from imatrix.errors import ImatrixError
from imatrix.plan_gguf import ModelFile
from imatrix.plan_tensors import (
    SOURCE_TYPES,
    PlanTensor,
    allows_quantization,
    eligible,
    tensor_group,
)
from imatrix.qtypes import parse_ggml_type
from imatrix.quantize import PreparedImatrix


def candidate_types(names: Sequence[str]) -> list[int]:
    """ggml type ids of candidate names (quantized types only, duplicates dropped)."""
    out: list[int] = []
    for n in names:
        tid = parse_ggml_type(n, "candidate type in --types")
        q = GGMLQuantizationType(tid)
        if q in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
            raise ImatrixError(f"candidate type '{n}' in --types is not a quantized type")
        if tid not in out:
            out.append(tid)
    return out


def _means_size(t_ne: tuple[int, ...]) -> int:
    return t_ne[0] * (t_ne[2] if len(t_ne) > 2 else 1)


def load_tensors(model: ModelFile, imx: PreparedImatrix) -> list[PlanTensor]:
    """The tensors llama-quantize quantizes, checked against the imatrix."""
    path = model.path
    names = {t.name for t in model.tensors}
    extra = sorted(set(imx.means) - names)
    if extra:
        raise ImatrixError(
            f"{imx.path}: has {len(extra)} entries for tensors {path} lacks (e.g. "
            f"'{extra[0]}'); an imatrix of another model?"
        )
    out = []
    for rt in sorted(model.tensors, key=lambda t: t.name):
        ne = rt.ne
        if not allows_quantization(rt.name, ne):
            continue
        src = GGMLQuantizationType(rt.type)
        if src not in SOURCE_TYPES:
            raise ImatrixError(f"{path}: tensor '{rt.name}' is {src.name}; plan needs F32/F16/BF16")
        m = imx.means.get(rt.name)
        if m is not None and m.size != _means_size(ne) and rt.name != "token_embd.weight":
            raise ImatrixError(
                f"{imx.path}: entry '{rt.name}' has {m.size} values, the tensor needs "
                f"{_means_size(ne)}; an imatrix of another model?"
            )
        has = m is not None and m.size == _means_size(ne)
        out.append(PlanTensor(rt.name, ne, src, tensor_group(rt.name), has))
    if not out:
        raise ImatrixError(f"{path}: no tensor llama-quantize would quantize")
    return out


def options_for(
    tensors: Sequence[PlanTensor], cands: Sequence[int], stock: Mapping[str, GGMLQuantizationType]
) -> dict[str, list[int]]:
    """Per tensor: its eligible candidates plus its stock type (F16 if none fits)."""
    out: dict[str, list[int]] = {}
    for t in tensors:
        opts = [q for q in cands if eligible(t, GGMLQuantizationType(q))]
        s = stock.get(t.name)
        if s is not None and int(s) not in opts:
            opts.append(int(s))
        out[t.name] = opts or [int(GGMLQuantizationType.F16)]
    return out


def check_candidates(tensors: Sequence[PlanTensor], cands: Sequence[int]) -> None:
    """Refuse candidate types that no tensor can take."""
    unused = [
        GGMLQuantizationType(q).name
        for q in cands
        if not any(eligible(t, GGMLQuantizationType(q)) for t in tensors)
    ]
    if unused:
        raise ImatrixError(
            f"no tensor accepts candidate type(s) {', '.join(unused)} (block size does "
            "not divide any row, or they need importance data the imatrix lacks)"
        )
