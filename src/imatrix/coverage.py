"""Expert coverage of a MoE imatrix: how many tokens each expert was routed, per dataset
and in the merge, and what llama-quantize makes of experts that saw few or none.

Why a module of its own: "did every expert of my MoE see tokens?" is asked of three
things that share nothing else: the health check (``imatrix check``, the merge's gate),
the statistics (``coverage.parquet``, the report) and the workflow (per dataset, from
the shards). All of them read the same numbers, defined here once.

Where the numbers come from: for a ``MUL_MAT_ID`` (the ``ffn_*_exps`` stacks)
llama-imatrix adds 1 to ``counts[e]`` for every token routed to expert ``e``
(tools/imatrix/imatrix.cpp: ``IMatrixCollector::collect_imatrix``), so a GGUF imatrix's
``<name>.counts`` holds one token count per expert; gate, up and down of a layer see the
same routing and hold the same counts. A legacy ``.dat`` keeps one count per entry, so
it has no per-expert coverage. Counts are read as llama.cpp reads them, rounded to
integers (:func:`imatrix.stats.lround_counts`). In a merged imatrix the counts carry the
dataset weights (normalized so the smallest is 1); per-dataset counts are raw tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from imatrix.atomic import atomic_output
from imatrix.errors import ImatrixError
from imatrix.model import ImatrixData
from imatrix.stats import layer_number, lround_counts, split_name

log = logging.getLogger(__name__)

COVERAGE_FILE = "coverage.parquet"

#: Default of ``min_expert_tokens`` (``imatrix check --min-expert-tokens``, config
#: ``health.min_expert_tokens``): 0 reports no expert, so the check is opt-in; experts that
#: never fired are reported by the ``dead_experts`` check regardless.
DEFAULT_MIN_EXPERT_TOKENS = 0

# What llama-quantize does with an expert's count (pinned llama.cpp 0.3.36):
# - tools/quantize/quantize.cpp: load_imatrix: for a GGUF imatrix, an expert with count > 0
#   gets e = in_sum2 / count for each channel; an expert with count 0 gets e = 1 for every
#   channel. There is no minimum count and no smoothing.
# - common/imatrix-loader.cpp: common_imatrix_load: counts are read with std::lround, so a
#   (weighted) count below 0.5 is 0.
# - src/llama-quant.cpp: llama_tensor_quantize_impl: each expert's rows are quantized with
#   that expert's own slice of the imatrix (row / nrows_per_expert).
# - ggml/src/ggml-quants.c (e.g. quantize_row_q4_K_impl): the quantizer weights a value by
#   importance · sqrt(sigma2 + x²), without an imatrix by av_x + |x|: a flat importance of 1
#   is therefore not the same as quantizing that expert without an imatrix.
#: What quantize does with an expert that was routed no token.
QUANTIZE_ZERO = "count 0: llama-quantize uses importance 1 on every channel (flat, uncalibrated)"
#: What quantize does with an expert that was routed a few tokens.
QUANTIZE_LOW = "low count: llama-quantize uses sum/count of those few tokens, no minimum"

#: Parquet schema of ``coverage.parquet``: one row per expert tensor and expert; ``dataset``
#: is null for the merged imatrix (weighted counts), else a dataset name (raw tokens).
COVERAGE_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("name", pa.string()),
        ("layer", pa.int32()),
        ("tensor", pa.string()),
        ("expert", pa.int32()),
        ("tokens", pa.int64()),
    ]
)


def expert_tokens(data: ImatrixData) -> dict[str, np.ndarray]:
    """Token counts per expert (int64, as llama.cpp rounds them) of every expert tensor
    (an entry with more than one count), by tensor name, sorted.

    Non-finite counts (a corrupt file, reported by the health check) count as 0.
    """
    out: dict[str, np.ndarray] = {}
    for name in sorted(data.entries):
        c = data.entries[name].counts
        if c.size > 1:
            out[name] = lround_counts(np.nan_to_num(c, nan=0.0, posinf=0.0, neginf=0.0))
    return out


def _rows(tokens: dict[str, np.ndarray], dataset: str | None) -> Iterator[dict[str, Any]]:
    for name, c in tokens.items():
        layer_s, kind = split_name(name)
        layer = layer_number(layer_s) if layer_s != "-" else None
        for i, n in enumerate(c.tolist()):
            yield {
                "dataset": dataset,
                "name": name,
                "layer": layer,
                "tensor": kind,
                "expert": i,
                "tokens": n,
            }


def coverage_frame(data: ImatrixData, dataset: str | None = None) -> pd.DataFrame:
    """``coverage.parquet``'s rows for one imatrix (``dataset`` None: the merged one)."""
    return _typed(list(_rows(expert_tokens(data), dataset)))


def _typed(rows: list[dict[str, Any]]) -> pd.DataFrame:
    table = pa.Table.from_pylist(rows, schema=COVERAGE_SCHEMA)
    df: pd.DataFrame = table.to_pandas(types_mapper=pd.ArrowDtype)
    return df


def dataset_tokens(shards: Sequence[str], datasets: Sequence[str]) -> dict[str, ImatrixData]:
    """Per dataset, the sum of its shards' counts (raw tokens, no weights).

    Only the counts are kept (the sums are dropped after each shard), so the memory is
    one shard's. ``datasets[i]`` names the dataset of ``shards[i]``.
    """
    from imatrix.formats import read_imatrix
    from imatrix.model import Entry

    if len(shards) != len(datasets):
        raise ImatrixError(f"{len(shards)} shards but {len(datasets)} dataset names")
    out: dict[str, ImatrixData] = {}
    for path, d in zip(shards, datasets, strict=True):
        acc = out.setdefault(d, ImatrixData(datasets=[d])).entries
        for name, e in read_imatrix(path).entries.items():
            prev = acc.get(name)
            if prev is not None and prev.counts.size != e.counts.size:
                raise ImatrixError(
                    f"{path}: tensor '{name}' has {e.counts.size} counts, "
                    f"other shards of dataset '{d}' have {prev.counts.size}"
                )
            total = e.counts if prev is None else prev.counts + e.counts
            acc[name] = Entry(np.zeros(total.size), total)
    return out


def coverage_table(merged: ImatrixData, per_dataset: dict[str, ImatrixData]) -> pd.DataFrame:
    """The merged imatrix's rows, then each dataset's, in the order given."""
    rows = list(_rows(expert_tokens(merged), None))
    for name, d in per_dataset.items():
        rows += _rows(expert_tokens(d), name)
    return _typed(rows)


def write_coverage(table: pd.DataFrame, path: str | Path) -> Path:
    """Write ``table`` (:data:`COVERAGE_SCHEMA`) atomically to ``path``."""
    p = Path(path)
    missing = [f.name for f in COVERAGE_SCHEMA if f.name not in table.columns]
    if missing:
        raise ImatrixError(f"{p}: coverage table lacks columns {', '.join(missing)}")
    t = pa.Table.from_pandas(
        table[COVERAGE_SCHEMA.names], schema=COVERAGE_SCHEMA, preserve_index=False
    )
    with atomic_output(p) as tmp:
        pq.write_table(t, tmp)
    log.info("wrote %s (%d rows)", p, t.num_rows)
    return p


def write_run_coverage(
    imatrix: str, shards: Sequence[str], datasets: Sequence[str], output: str | Path
) -> Path:
    """The workflow's ``coverage.parquet``: the merged imatrix's coverage and each
    dataset's (from its shards). A dense model gives a table with no rows."""
    from imatrix.formats import read_imatrix

    table = coverage_table(read_imatrix(imatrix), dataset_tokens(shards, datasets))
    return write_coverage(table, output)


def summary(tokens: dict[str, np.ndarray], min_expert_tokens: int) -> dict[str, Any] | None:
    """The coverage in a few numbers (None without expert tensors), for ``check``'s
    report and its JSON: the per-expert counts of every expert tensor, their minimum,
    median and maximum, how many never fired and how many saw fewer than
    ``min_expert_tokens``, and what llama-quantize does with those."""
    if not tokens:
        return None
    every = np.concatenate(list(tokens.values()))
    return {
        "expert_tensors": len(tokens),
        "experts": int(max(c.size for c in tokens.values())),
        "min_expert_tokens": int(min_expert_tokens),
        "tokens_min": int(every.min()),
        "tokens_median": float(np.median(every)),
        "tokens_max": int(every.max()),
        "never_fired": int(np.count_nonzero(every == 0)),
        "below_min": int(np.count_nonzero(every < min_expert_tokens)),
        "quantize_zero_count": QUANTIZE_ZERO,
        "quantize_low_count": QUANTIZE_LOW,
        "tokens": {name: c.tolist() for name, c in tokens.items()},
    }


def summary_line(s: dict[str, Any]) -> str:
    """One line of :func:`summary` for people."""
    line = (
        f"expert coverage: {s['expert_tensors']} expert tensors x {s['experts']} experts, "
        f"tokens per expert min {s['tokens_min']}, median {s['tokens_median']:g}, "
        f"max {s['tokens_max']}; {s['never_fired']} never fired"
    )
    if s["min_expert_tokens"] > 0:
        line += f", {s['below_min']} below {s['min_expert_tokens']}"
    return line


def layer_view(table: pd.DataFrame, min_expert_tokens: int) -> pd.DataFrame:
    """The report's small view of ``coverage.parquet``: per dataset (merged first) and
    layer, the experts' token counts (least covered tensor kind of the layer) as min,
    median and max, with how many experts never fired and (when ``min_expert_tokens``
    is above 0) how many saw fewer tokens."""
    if table.empty:
        return pd.DataFrame()
    t = table.astype({"tokens": "int64", "expert": "int64"}).copy()
    t["dataset"] = t["dataset"].astype("object").where(t["dataset"].notna(), "(merged)")
    per_expert = t.groupby(["dataset", "layer", "expert"], sort=False)["tokens"].min()
    g = per_expert.groupby(level=["dataset", "layer"], sort=False)
    view = pd.DataFrame(
        {
            "experts": g.size(),
            "tokens_min": g.min(),
            "tokens_median": g.median(),
            "tokens_max": g.max(),
            "never_fired": g.apply(lambda s: int((s == 0).sum())),
        }
    )
    if min_expert_tokens > 0:
        view[f"below_{min_expert_tokens}"] = g.apply(lambda s: int((s < min_expert_tokens).sum()))
    return view.reset_index()
