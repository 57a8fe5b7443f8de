"""Strict JSON for every ``--json`` output.

Why not plain :func:`json.dumps`: it writes ``NaN`` and ``Infinity`` for non-finite
floats (a missing value in a pandas table is NaN), which is not JSON; strict parsers
(``jq``, JavaScript, Go) reject the whole document. Here non-finite floats become
``null`` and numpy scalars become Python numbers, and :func:`json.dumps` is told
``allow_nan=False`` so that nothing non-standard can slip through.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None and numpy scalars and arrays
    turned into Python values (dicts, lists and tuples are walked)."""
    if isinstance(obj, np.ndarray):
        return finite(obj.tolist())
    if isinstance(obj, np.generic):
        return finite(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, *, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj``; values JSON has no type for are written as strings."""
    return json.dumps(finite(obj), indent=indent, allow_nan=False, default=str)
