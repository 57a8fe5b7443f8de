"""Recipe files: llama-quantize's ``--tensor-type-file`` format, plus a JSON sidecar.

Why this exact format: the recipe must work with stock ``llama-quantize
--tensor-type-file`` as well as ours. That parser reads whitespace-separated
``NAME=TYPE`` tokens (no comment syntax), lower-cases NAME, and llama.cpp applies the
first pattern for which ``std::regex_search`` matches the tensor name. One anchored
pattern per tensor (``^blk\\.3\\.ffn_down\\.weight$``) therefore matches that tensor
and no other, whatever the order. Everything else (model and imatrix sha256, budget,
the ftype and the exact invocation, predicted size and KLD) goes into
``RECIPE.json`` beside it, strict JSON, written after the recipe, both atomically.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imatrix.atomic import atomic_write
from imatrix.constants import GGMLQuantizationType
from imatrix.errors import ImatrixError

#: ECMAScript regex syntax characters (escaped in patterns)
_SYNTAX = set("^$\\.*+?()[]{}|/")
_LINE_RE = re.compile(r"^\^(?P<name>.+)\$$")


def pattern(name: str) -> str:
    """The anchored pattern matching exactly ``name`` (std::regex ECMAScript and ``re``)."""
    if name != name.lower():
        raise ImatrixError(
            f"tensor '{name}' has upper-case letters; llama-quantize lower-cases "
            "--tensor-type patterns, so no recipe line can name it"
        )
    return "^" + "".join("\\" + c if c in _SYNTAX else c for c in name) + "$"


def unpattern(pat: str) -> str:
    """The tensor name of an anchored pattern made by :func:`pattern`."""
    m = _LINE_RE.match(pat)
    if m is None:
        raise ImatrixError(f"recipe pattern '{pat}' is not an anchored tensor name")
    return re.sub(r"\\(.)", r"\1", m.group("name"))


def recipe_entries(types: Mapping[str, int]) -> list[str]:
    """``NAME=TYPE`` tokens, sorted by tensor name."""
    return [f"{pattern(name)}={GGMLQuantizationType(types[name]).name}" for name in sorted(types)]


def recipe_text(types: Mapping[str, int]) -> str:
    return "\n".join(recipe_entries(types)) + "\n"


def read_recipe(path: str | Path) -> dict[str, int]:
    """A recipe written by :func:`write_recipe`: tensor name -> ggml type."""
    out: dict[str, int] = {}
    for tok in Path(path).read_text(encoding="utf-8").split():
        pat, sep, qtype = tok.partition("=")
        if not sep:
            raise ImatrixError(f"{path}: malformed recipe entry '{tok}'")
        try:
            out[unpattern(pat)] = int(GGMLQuantizationType[qtype.upper()])
        except KeyError:
            raise ImatrixError(f"{path}: unknown type in recipe entry '{tok}'") from None
    return out


def sidecar_path(recipe: str | Path) -> Path:
    return Path(f"{recipe}.json")


def write_recipe(path: str | Path, types: Mapping[str, int], sidecar: Mapping[str, Any]) -> None:
    """Write the recipe and its sidecar (both atomically, recipe first)."""
    text = json.dumps(sidecar, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write(Path(path), recipe_text(types).encode("utf-8"))
    atomic_write(sidecar_path(path), text.encode("utf-8"))
