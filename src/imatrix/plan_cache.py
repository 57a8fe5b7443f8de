"""The planner's cache: per-tensor error estimates and calibrated sensitivities (Parquet).

Why a cache: the estimates and the calibration measurements are the slow part of a
plan and do not depend on the budget, so a second plan of the same model with the
same imatrix (another size) reuses them and takes seconds. Rows are keyed by a hash
of the model's and the imatrix's sha256 and the settings that change the numbers;
rows of other keys are kept, so plans of several models may share one file. Written
atomically; an unreadable cache is ignored (and rewritten), never trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from imatrix.atomic import atomic_write

log = logging.getLogger(__name__)

COLUMNS = ["key", "kind", "tensor", "qtype", "value"]
KIND_ERROR = "error"
KIND_SENSITIVITY = "sensitivity"
#: bump when the meaning of cached numbers changes
CACHE_VERSION = 1


def cache_key(**parts: Any) -> str:
    """A short stable hash of the given settings (JSON with sorted keys)."""
    text = json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


@dataclass
class PlanCache:
    """The cache file's rows, with lookups for one key at a time."""

    path: Path
    rows: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=COLUMNS))

    @classmethod
    def load(cls, path: str | Path) -> PlanCache:
        p = Path(path)
        if not p.exists():
            return cls(p)
        try:
            df = pd.read_parquet(p)
            if list(df.columns) != COLUMNS:
                raise ValueError(f"columns {list(df.columns)}")
        except Exception as exc:  # a damaged cache is recomputed, not trusted
            log.warning("%s: unreadable plan cache (%s); recomputing", p, exc)
            return cls(p)
        return cls(p, df)

    def values(self, key: str, kind: str) -> dict[tuple[str, str], float]:
        sel = self.rows[(self.rows["key"] == key) & (self.rows["kind"] == kind)]
        return {
            (str(t), str(q)): float(v)
            for t, q, v in zip(sel["tensor"], sel["qtype"], sel["value"], strict=True)
        }

    def update(self, key: str, kind: str, values: Mapping[tuple[str, str], float]) -> None:
        new = pd.DataFrame(
            [(key, kind, t, q, float(v)) for (t, q), v in sorted(values.items())],
            columns=COLUMNS,
        )
        df = pd.concat([self.rows, new], ignore_index=True) if len(self.rows) else new
        df = df.drop_duplicates(subset=COLUMNS[:4], keep="last")
        self.rows = df.sort_values(COLUMNS[:4], kind="mergesort").reset_index(drop=True)

    def save(self) -> None:
        buf = io.BytesIO()
        self.rows.to_parquet(buf, index=False)
        atomic_write(self.path, buf.getvalue())
