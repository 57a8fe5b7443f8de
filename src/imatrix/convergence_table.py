"""Convergence records as tables (``convergence.parquet``), a plot, and ``stats``' verdict.

Why a table per model with a merged view: a workflow collects each dataset in shards,
each with its own record (every shard starts from nothing). The rows ``view = shard``
are those records; the rows ``view = merged`` take, at each number of tokens into a
shard, the largest maximum and the median of the medians over every shard of every
dataset: "the worst shard after this many tokens", which is what a per-shard stop rule
has to beat.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from imatrix.atomic import atomic_output
from imatrix.convergence import ConvergenceLog, StopRule, converged_at
from imatrix.errors import ImatrixError
from imatrix.model import ImatrixData

log = logging.getLogger(__name__)

CONVERGENCE_FILE = "convergence.parquet"
CONVERGENCE_PLOT = "convergence.png"
VIEW_SHARD = "shard"
VIEW_MERGED = "merged"
#: the dataset name of the merged rows
MERGED_DATASET = "*"

SCHEMA = pa.schema(
    [
        pa.field("view", pa.string()),
        pa.field("dataset", pa.string()),
        pa.field("shard", pa.int32()),
        pa.field("chunk", pa.int64()),
        pa.field("chunks", pa.int64()),
        pa.field("tokens", pa.int64()),
        pa.field("max", pa.float64()),
        pa.field("median", pa.float64()),
        pa.field("worst", pa.string()),
    ]
)


def read_log(data: ImatrixData, source: str) -> ConvergenceLog | None:
    """The convergence record an imatrix carries (None: it has none)."""
    raw = data.provenance.convergence
    return None if raw is None else ConvergenceLog.from_json(raw, source)


def log_frame(conv: ConvergenceLog, *, dataset: str, shard: int | None) -> pd.DataFrame:
    """One row per record of one collection."""
    rows = [
        {"view": VIEW_SHARD, "dataset": dataset, "shard": shard, **r.summary_dict()}
        for r in conv.records
    ]
    return _typed(pd.DataFrame(rows, columns=SCHEMA.names))


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    return df.astype(
        {
            "view": "string",
            "dataset": "string",
            "shard": "Int32",
            "chunk": "int64",
            "chunks": "int64",
            "tokens": "int64",
            "max": "float64",
            "median": "float64",
            "worst": "string",
        }
    )


def merged_view(shards: pd.DataFrame) -> pd.DataFrame:
    """Per number of tokens into a shard: the largest maximum, the median of medians."""
    if shards.empty:
        return shards.copy()
    g = shards.groupby("tokens", sort=True)
    top = shards.sort_values("max", ascending=False, kind="stable").drop_duplicates("tokens")
    top = top.set_index("tokens").sort_index()
    worst = [
        None if pd.isna(w) else (f"{d}: {w}" if pd.isna(sh) else f"{d}/{sh}: {w}")
        for d, sh, w in zip(top["dataset"], top["shard"], top["worst"], strict=True)
    ]
    out = pd.DataFrame(
        {
            "view": VIEW_MERGED,
            "dataset": MERGED_DATASET,
            "shard": None,
            "chunk": g["chunks"].max().to_numpy(),
            "chunks": g["chunks"].max().to_numpy(),
            "tokens": g["tokens"].first().to_numpy(),
            "max": g["max"].max().to_numpy(),
            "median": g["median"].median().to_numpy(),
            "worst": worst,
        }
    )
    return _typed(out[SCHEMA.names])


def convergence_table(logs: Sequence[tuple[str, int | None, ConvergenceLog]]) -> pd.DataFrame:
    """Every record of ``(dataset, shard, log)`` and the merged view below them."""
    frames = [log_frame(c, dataset=d, shard=s) for d, s, c in logs]
    shards = (
        _typed(pd.concat(frames, ignore_index=True))
        if frames
        else log_frame(ConvergenceLog(interval=1), dataset="", shard=None)
    )
    return _typed(pd.concat([shards, merged_view(shards)], ignore_index=True))


def write_convergence_parquet(df: pd.DataFrame, path: str | Path) -> Path:
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImatrixError(f"{p.parent}: cannot create directory: {exc.strerror or exc}") from exc
    table = pa.Table.from_pandas(df[SCHEMA.names], schema=SCHEMA, preserve_index=False)
    with atomic_output(p) as tmp:
        pq.write_table(table, tmp)
    log.info("wrote %s", p)
    return p


def verdict(conv: ConvergenceLog | None, rule: StopRule) -> str:
    """``stats``' line: where the rule says the collection converged."""
    if conv is None or not conv.records:
        return "convergence: no record in this imatrix (collected without one, or merged)"
    how = f"max 1-cos < {rule.eps:g} for {rule.patience} consecutive records"
    at = converged_at(conv.records, rule)
    last = conv.records[-1]
    stop = "" if conv.stopped_at is None else f"; collection stopped at chunk {conv.stopped_at}"
    if at is None:
        return f"not converged after {last.tokens} tokens ({how}; last max {last.max:.3g}){stop}"
    return f"converged after {at.tokens} tokens ({at.chunks} chunks; {how}){stop}"


def finite_or_nan(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Values for a log scale: non-positive ones (no change at all) become NaN."""
    a = np.asarray(values, dtype=np.float64)
    return np.where(a > 0, a, np.nan)


__all__ = [
    "CONVERGENCE_FILE",
    "CONVERGENCE_PLOT",
    "MERGED_DATASET",
    "SCHEMA",
    "VIEW_MERGED",
    "VIEW_SHARD",
    "convergence_table",
    "finite_or_nan",
    "log_frame",
    "merged_view",
    "read_log",
    "verdict",
    "write_convergence_parquet",
]
