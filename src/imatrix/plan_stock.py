"""The per-tensor types llama-quantize would choose, from its own dry run.

Why llama.cpp's dry run (``llama_model_quantize_params.dry_run``) and not a port of
its type-selection rules: the stock mixes (Q4_K_M, IQ3_XXS, ...) depend on the
architecture, layer counts, GQA ratio and whether an imatrix is given, and change
between llama.cpp versions; the dry run runs the real selection, overrides and
fallbacks without quantizing. It reports each tensor's type only in its log
(``[ i/ n] NAME - [shape], type = SRC, size = A MiB -> B MiB (TYPE)``), which
:func:`imatrix.quantize.quantize_dry_run` returns. The same dry run checks
a recipe before it is written: every tensor must get the type its line names.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence

from imatrix.constants import GGMLQuantizationType
from imatrix.errors import ImatrixError
from imatrix.qtypes import parse_quant_type
from imatrix.quantize import PreparedImatrix, QuantizeOptions, quantize_dry_run

log = logging.getLogger(__name__)

_TENSOR_RE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[.*\], type =\s*(\w+),")
_TARGET_RE = re.compile(r"size = .*-> .*\((\w+)\)\s*$")
_FALLBACK_RE = re.compile(r"falling back|required fallback")


def parse_dry_run(lines: Sequence[str]) -> tuple[dict[str, GGMLQuantizationType], int]:
    """Each tensor's resulting type, and the number of fallback lines."""
    out: dict[str, GGMLQuantizationType] = {}
    current: tuple[str, str] | None = None
    fallbacks = 0
    for line in lines:
        if _FALLBACK_RE.search(line):
            fallbacks += 1
        m = _TENSOR_RE.match(line)
        if m:
            current = (m.group(1), m.group(2))
            out[current[0]] = GGMLQuantizationType[current[1].upper()]
            continue
        m = _TARGET_RE.search(line)
        if m and current is not None:
            out[current[0]] = GGMLQuantizationType[m.group(1).upper()]
            current = None
    return out, fallbacks


def dry_run(
    base: str | os.PathLike[str],
    qtype: str,
    imx: PreparedImatrix | None,
    tensor_types: Sequence[tuple[str, int]] = (),
) -> tuple[dict[str, GGMLQuantizationType], int]:
    """Types llama-quantize gives each tensor of ``base`` as ``qtype`` (with the imatrix
    and ``(regex, ggml type)`` overrides), and how many fallbacks it logged."""
    _, ftype = parse_quant_type(qtype)
    opts = QuantizeOptions(ftype=ftype, tensor_types=list(tensor_types))
    try:
        lines = quantize_dry_run(base, opts, imx)
    except ImatrixError as exc:
        raise ImatrixError(f"{exc} (as {qtype})") from None
    types, fallbacks = parse_dry_run(lines)
    if not types:
        raise ImatrixError(f"{base}: llama.cpp's dry run as {qtype} listed no tensors")
    return types, fallbacks
