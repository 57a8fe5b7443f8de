"""Per-tensor and per-layer statistics of an imatrix: DataFrames, Parquet, and the text tables.

Why two column families: the *legacy* columns (Σ(Act²), min/max/μ/σ of the per-channel
mean squared activations, % active, entropy, ZD, CosSim of raw sums) reproduce what the
pinned ``llama-imatrix --in-file X --show-statistics`` prints, so users can check our
numbers against the tool they know. The *preferred* columns (L₂ distance, CosSim and
ECS of the mean activations, llama.cpp PR 14891) need the plain sums of activations
(``<name>.in_sum``) that only our collector stores; they describe how much each layer
changes the signal, which squared activations cannot (they lose the sign).

Everything is computed in float64 with numpy, one tensor at a time (vectorized over its
elements). llama-imatrix computes in float32, so the two agree within printed precision.
Definitions and the Parquet schema are documented in ``docs/statistics.md``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from imatrix.atomic import atomic_output
from imatrix.errors import ImatrixError
from imatrix.model import Entry, ImatrixData

log = logging.getLogger(__name__)

#: ECS = K · e^(−α·L₂) · |CosSim|^γ. The seed README leaves K open; llama.cpp's
#: implementation of PR 14891 prints the score scaled by 100, so K = 100 gives the same
#: numbers and reads as "percent of a perfect (unchanged) layer".
DEFAULT_ECS_K = 100.0
ECS_ALPHA = 0.01
ECS_GAMMA = 10.0

#: llama-imatrix counts a channel as inactive when its mean squared activation is at most this.
ACTIVE_THRESHOLD = 1e-5

TENSORS_FILE = "tensors.parquet"
LAYERS_FILE = "layers.parquet"

_BLK = re.compile(r"blk\.(\d+)\.")

#: Parquet schema of ``tensors.parquet`` (one row per imatrix entry); see docs/statistics.md.
TENSOR_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("layer", pa.int32()),
        ("tensor", pa.string()),
        ("n_mat", pa.int32()),
        ("n_mat_active", pa.int32()),
        ("row_size", pa.int64()),
        ("count_min", pa.int64()),
        ("count_max", pa.int64()),
        ("elements", pa.int64()),
        ("sum_sqact", pa.float64()),
        ("sqact_min", pa.float64()),
        ("sqact_max", pa.float64()),
        ("sqact_mean", pa.float64()),
        ("sqact_std", pa.float64()),
        ("active_pct", pa.float64()),
        ("entropy", pa.float64()),
        ("entropy_norm_pct", pa.float64()),
        ("zd_pct", pa.float64()),
        ("cossim", pa.float64()),
        ("has_sums", pa.bool_()),
        ("act_min", pa.float64()),
        ("act_max", pa.float64()),
        ("act_mean", pa.float64()),
        ("act_std", pa.float64()),
        ("act_zd_pct", pa.float64()),
        ("l2_dist", pa.float64()),
        ("cossim_act", pa.float64()),
        ("ecs", pa.float64()),
    ]
)

#: Parquet schema of ``layers.parquet`` (one row per ``blk.N`` layer with data).
LAYER_SCHEMA = pa.schema(
    [
        ("layer", pa.int32()),
        ("n_tensors", pa.int32()),
        ("elements", pa.int64()),
        ("sum_sqact", pa.float64()),
        ("wmean_sum_sqact", pa.float64()),
        ("wmean_zd_pct", pa.float64()),
        ("wmean_cossim", pa.float64()),
        ("act_zd_pct", pa.float64()),
        ("l2_dist", pa.float64()),
        ("cossim_act", pa.float64()),
        ("ecs", pa.float64()),
    ]
)

#: statistics a user may plot per layer and tensor kind (numeric tensor columns)
PLOTTABLE = tuple(
    f.name
    for f in TENSOR_SCHEMA
    if pa.types.is_floating(f.type) or f.name in ("elements", "count_min", "count_max")
)


# ---------------------------------------------------------------------------
# names


def split_name(name: str) -> tuple[str, str]:
    """``(layer, kind)`` of a tensor name, as llama-imatrix's table shows them.

    The layer is the dot-separated component after ``blk`` (``"-"`` when there is none),
    the kind the component before ``weight`` (the whole name when there is none):
    ``blk.3.ffn_down_exps.weight`` → ``("3", "ffn_down_exps")``.
    """
    parts = name.split(".")
    layer = next((parts[i + 1] for i in range(len(parts) - 1) if parts[i] == "blk"), "")
    kind = next((parts[i - 1] for i in range(1, len(parts)) if parts[i] == "weight"), "")
    return layer or "-", kind or name


def layer_number(layer: str) -> int | None:
    """The block number of a ``split_name`` layer, or None (llama.cpp's ``stoi`` on a prefix)."""
    m = re.match(r"\s*([+-]?\d+)", layer)
    return int(m.group(1)) if m else None


def previous_layer_name(name: str) -> str | None:
    """The same tensor one block earlier (``blk.N.`` → ``blk.N-1.``), None outside blocks."""
    m = _BLK.search(name)
    if m is None:
        return None
    return name[: m.start(1)] + str(int(m.group(1)) - 1) + name[m.end(1) :]


# ---------------------------------------------------------------------------
# per-tensor computation


def lround_counts(counts: np.ndarray) -> np.ndarray:
    """Counts as llama.cpp holds them after loading: ``std::lround`` to int64."""
    c = np.asarray(counts, dtype=np.float64)
    return (np.sign(c) * np.floor(np.abs(c) + 0.5)).astype(np.int64)


@dataclass
class _TensorVectors:
    """What the cross-layer statistics need from one tensor."""

    values: np.ndarray  # raw sums of squares, all experts (llama-imatrix's CosSim input)
    averages: np.ndarray | None  # E[x] per expert, zeros for dead experts (PR 14891)
    has_stats: bool


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-np.sum(p * np.log2(p)))


def _tensor_row(name: str, e: Entry) -> tuple[dict[str, Any], _TensorVectors]:
    layer_s, kind = split_name(name)
    n_mat = e.n_counts
    row = e.row_size
    counts = lround_counts(e.counts)
    live = counts != 0
    mat = e.values.reshape(n_mat, row)
    sq = (mat[live] / counts[live, None]).reshape(-1)  # E[x²] per channel of live experts
    n = int(sq.size)
    r: dict[str, Any] = {
        "name": name,
        "layer": layer_number(layer_s) if layer_s != "-" else None,
        "tensor": kind,
        "n_mat": n_mat,
        "n_mat_active": int(np.count_nonzero(live)),
        "row_size": row,
        "count_min": int(counts.min()),
        "count_max": int(counts.max()),
        "elements": n,
        "has_sums": e.sums is not None,
    }
    r.update(_sqact_stats(sq))
    averages = None
    if e.sums is not None:
        smat = e.sums.reshape(n_mat, row)
        avg = np.zeros_like(smat)
        avg[live] = smat[live] / counts[live, None]
        averages = avg.reshape(-1)
        if n:
            r.update(_act_stats(avg[live].reshape(-1)))
    for k in ("act_min", "act_max", "act_mean", "act_std", "act_zd_pct"):
        r.setdefault(k, float("nan"))
    return r, _TensorVectors(e.values, averages, n > 0)


_SQACT_KEYS = (
    "sum_sqact",
    "sqact_min",
    "sqact_max",
    "sqact_mean",
    "sqact_std",
    "active_pct",
    "entropy",
    "entropy_norm_pct",
    "zd_pct",
)


def _sqact_stats(sq: np.ndarray) -> dict[str, float]:
    """Statistics of the mean squared activations ``sq`` of one tensor (NaN if empty)."""
    nan = float("nan")
    n = int(sq.size)
    if not n:
        return dict.fromkeys(_SQACT_KEYS, nan)
    total = float(sq.sum())
    mean = total / n
    std = float(np.sqrt(max(0.0, float(np.mean(sq * sq)) - mean * mean)))
    entropy = _entropy(sq / total) if total > 0 else 0.0
    zd = float(np.count_nonzero((sq - mean) / std > 1.0)) / n if std > 0 else 0.0
    return {
        "sum_sqact": total,
        "sqact_min": float(sq.min()),
        "sqact_max": float(sq.max()),
        "sqact_mean": mean,
        "sqact_std": std,
        "active_pct": 100.0 * (1.0 - np.count_nonzero(np.abs(sq) <= ACTIVE_THRESHOLD) / n),
        "entropy": entropy,
        "entropy_norm_pct": 100.0 * entropy / np.log2(n) if n > 1 else nan,
        "zd_pct": 100.0 * zd,
    }


def _act_stats(act: np.ndarray) -> dict[str, float]:
    """Statistics of the mean activations ``act`` of one tensor's live experts."""
    n = int(act.size)
    amean = float(act.mean())
    astd = float(act.std(ddof=1)) if n > 1 else 0.0
    azd = float(np.count_nonzero(np.abs((act - amean) / astd) > 1.0)) / n if astd > 0 else 0.0
    return {
        "act_min": float(act.min()),
        "act_max": float(act.max()),
        "act_mean": amean,
        "act_std": astd,
        "act_zd_pct": 100.0 * azd,
    }


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity as llama-imatrix computes it (NaN when a vector is all zero)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.dot(a, b) / (np.sqrt(np.dot(a, a)) * np.sqrt(np.dot(b, b))))


def _cosine_pr(a: np.ndarray, b: np.ndarray) -> float:
    """PR 14891's guarded cosine: clipped to [-1, 1]; 1 when both vectors are zero, 0 when one is."""
    na = float(np.dot(a, a))
    nb = float(np.dot(b, b))
    if na > 0 and nb > 0:
        return float(np.clip(np.dot(a, b) / (np.sqrt(na) * np.sqrt(nb)), -1.0, 1.0))
    return 1.0 if na == 0 and nb == 0 else 0.0


def ecs_score(l2: float, cossim: float, k: float = DEFAULT_ECS_K) -> float:
    """Euclidean-Cosine Score ``K·e^(−α·L₂)·|CosSim|^γ`` (α = 0.01, γ = 10)."""
    return float(k * np.exp(-ECS_ALPHA * l2) * np.abs(cossim) ** ECS_GAMMA)


def compute_statistics(
    data: ImatrixData, *, ecs_k: float = DEFAULT_ECS_K
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-tensor and per-layer statistics of ``data`` (schemas: :data:`TENSOR_SCHEMA`,
    :data:`LAYER_SCHEMA`).

    Every entry gets a row, including entries whose experts all have zero counts
    (``elements == 0``, statistics NaN) which llama-imatrix leaves out of its table.
    Cross-layer columns are null where there is no previous layer to compare with.
    """
    if not data.entries:
        raise ImatrixError("imatrix has no entries: nothing to compute statistics for")
    rows: list[dict[str, Any]] = []
    vecs: dict[str, _TensorVectors] = {}
    for name in sorted(data.entries):
        r, v = _tensor_row(name, data.entries[name])
        rows.append(r)
        vecs[name] = v

    # cross-layer statistics: the same tensor in block N-1
    pairs: dict[str, str] = {}
    for r in rows:
        name = r["name"]
        prev = previous_layer_name(name)
        cur = vecs[name]
        r["cossim"] = r["l2_dist"] = r["cossim_act"] = r["ecs"] = None
        if prev is None or prev not in vecs or not (cur.has_stats and vecs[prev].has_stats):
            continue
        pv = vecs[prev]
        if pv.values.size != cur.values.size:
            continue
        pairs[name] = prev
        r["cossim"] = _cosine(cur.values, pv.values)
        if cur.averages is not None and pv.averages is not None:
            l2 = float(np.linalg.norm(cur.averages - pv.averages))
            cs = _cosine_pr(cur.averages, pv.averages)
            r.update(l2_dist=l2, cossim_act=cs, ecs=ecs_score(l2, cs, ecs_k))

    tensors = _frame(rows, TENSOR_SCHEMA)
    layers = _layer_frame(tensors, vecs, pairs, ecs_k)
    return tensors, layers


def _layer_frame(
    tensors: pd.DataFrame,
    vecs: dict[str, _TensorVectors],
    pairs: dict[str, str],
    ecs_k: float,
) -> pd.DataFrame:
    out: list[dict[str, Any]] = []
    t = tensors[tensors["layer"].notna() & (tensors["elements"] > 0)]
    layer: Any
    for layer, g in t.groupby("layer", sort=True):
        if int(layer) < 0:
            continue
        n = g["elements"].to_numpy(dtype=np.float64)
        total = float(n.sum())
        has_prev = g["cossim"].notna().to_numpy()
        cs = g["cossim"].to_numpy(dtype=np.float64, na_value=0.0)
        r = {
            "layer": int(layer),
            "n_tensors": len(g),
            "elements": int(total),
            "sum_sqact": float(g["sum_sqact"].sum()),
            "wmean_sum_sqact": float(np.dot(n, g["sum_sqact"].to_numpy(np.float64)) / total),
            "wmean_zd_pct": float(np.dot(n, g["zd_pct"].to_numpy(np.float64)) / total),
            "wmean_cossim": float(np.dot(n, cs) / total) if has_prev.any() else None,
            "act_zd_pct": None,
            "l2_dist": None,
            "cossim_act": None,
            "ecs": None,
        }
        if g["has_sums"].all():
            r["act_zd_pct"] = float(np.dot(n, g["act_zd_pct"].to_numpy(np.float64)) / total)
            names = [nm for nm in g["name"] if nm in pairs and vecs[pairs[nm]].averages is not None]
            if names:
                cur = np.concatenate([_averages(vecs[nm]) for nm in names])
                prev = np.concatenate([_averages(vecs[pairs[nm]]) for nm in names])
                l2 = float(np.linalg.norm(cur - prev))
                c = _cosine_pr(cur, prev)
                r.update(l2_dist=l2, cossim_act=c, ecs=ecs_score(l2, c, ecs_k))
        out.append(r)
    return _frame(out, LAYER_SCHEMA)


def _rows(df: pd.DataFrame) -> Iterator[Any]:
    """The table's rows as named tuples (typed loosely: their fields are its columns)."""
    return df.itertuples(index=False)


def _averages(v: _TensorVectors) -> np.ndarray:
    """The per-channel mean activations (present: the tensor has activation sums)."""
    assert v.averages is not None
    return v.averages


def _frame(rows: list[dict[str, Any]], schema: pa.Schema) -> pd.DataFrame:
    """A DataFrame whose dtypes follow ``schema`` (nullable ints, float NaN for nulls)."""
    cols: dict[str, Any] = {}
    for f in schema:
        vals = [r.get(f.name) for r in rows]
        if pa.types.is_integer(f.type):
            cols[f.name] = pd.array(vals, dtype="Int32" if f.type == pa.int32() else "Int64")
        elif pa.types.is_floating(f.type):
            cols[f.name] = np.array([np.nan if v is None else v for v in vals], dtype=np.float64)
        elif pa.types.is_boolean(f.type):
            cols[f.name] = np.array(vals, dtype=bool)
        else:
            cols[f.name] = pd.array(vals, dtype="string")
    return pd.DataFrame(cols, columns=[f.name for f in schema])


# ---------------------------------------------------------------------------
# Parquet


def _write_table(df: pd.DataFrame, schema: pa.Schema, path: Path) -> None:
    missing = [f.name for f in schema if f.name not in df.columns]
    if missing:
        raise ImatrixError(f"{path}: statistics table lacks columns {', '.join(missing)}")
    table = pa.Table.from_pandas(df[[f.name for f in schema]], schema=schema, preserve_index=False)
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp)


def write_parquet(
    tensors: pd.DataFrame, layers: pd.DataFrame, outdir: str | Path
) -> tuple[Path, Path]:
    """Write ``tensors.parquet`` and ``layers.parquet`` into ``outdir`` (created if
    needed), each atomically, with the documented schema; returns both paths.

    Float columns hold NaN where a value is undefined (cross-layer columns without a
    previous layer, preferred columns without activation sums); Parquet stores them as
    nulls so that readers in other languages see "missing", not a number.
    """
    out = Path(outdir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImatrixError(f"{out}: cannot create directory: {exc.strerror or exc}") from exc
    tp, lp = out / TENSORS_FILE, out / LAYERS_FILE
    _write_table(tensors, TENSOR_SCHEMA, tp)
    _write_table(layers, LAYER_SCHEMA, lp)
    log.info("wrote %s and %s", tp, lp)
    return tp, lp


# ---------------------------------------------------------------------------
# text tables (llama-imatrix --show-statistics)


# printf formats of llama-imatrix's rows, kept as %-formats so they read like the C source
_LEGACY_ROW = "%5s\t%-20s\t%10.2f\t%8.4f\t%11.4f\t%6.2f\t%6.2f\t%8.2f%%\t%6d\t%10.4f\t%6.2f%%\t%10.2f%%\t%8.4f\n"
_LEGACY_LAYER_ROW = "%5d\t%14.2f\t%10.4f%%\t%6.4f\n"
_PREFERRED_ROW = (
    "%5s\t%s\t%11.4f\t%10.4f\t%10.4f\t%8.4f\t%8.4f\t%7d\t%10.2f%%\t%10.4f\t%6.2f%%\t%10.4f\n"
)
_PREFERRED_LAYER_ROW = "%5d\t%11.4f\t%6.2f%%\t%11.4f\t%8.4f\n"


def _cs(text: str, width: int, left: bool = False) -> str:
    """printf's ``%Ns`` / ``%-Ns``: pads to a width counted in bytes, as C does."""
    pad = max(0, width - len(text.encode("utf-8")))
    return text + " " * pad if left else " " * pad + text


def _z(v: Any) -> float:
    """A statistic as llama-imatrix prints it: 0 where we have none (null)."""
    return 0.0 if v is None or pd.isna(v) else float(v)


def render_statistics(
    data: ImatrixData,
    source: str,
    legacy: bool | None = None,
    *,
    ecs_k: float = DEFAULT_ECS_K,
) -> str:
    """The statistics table ``llama-imatrix --in-file SOURCE --show-statistics`` prints.

    ``legacy`` None chooses the legacy table (pinned llama-imatrix) for files without
    activation sums and the preferred table (PR 14891 layout: L₂ distance, ECS, CosSim
    of mean activations) otherwise; True forces the legacy table, which needs no sums.
    """
    tensors, layers = compute_statistics(data, ecs_k=ecs_k)
    if legacy is None:
        legacy = not bool(tensors["has_sums"].all())
    elif not legacy and not tensors["has_sums"].all():
        raise ImatrixError(
            f"{source}: has no activation sums (in_sum): only the legacy statistics are available"
        )
    return render_tables(tensors, layers, source, legacy=legacy, ecs_k=ecs_k)


def render_tables(
    tensors: pd.DataFrame,
    layers: pd.DataFrame,
    source: str,
    *,
    legacy: bool = True,
    ecs_k: float = DEFAULT_ECS_K,
) -> str:
    """Format already computed statistics (see :func:`render_statistics`)."""
    t = tensors[tensors["elements"] > 0].copy()
    t["x_layer_s"] = [split_name(n)[0] for n in t["name"]]
    t["x_kind_b"] = [k.encode("utf-8") for k in t["tensor"]]
    t["x_lnum"] = t["layer"].fillna(-1).astype(np.int64)
    key = "sum_sqact" if legacy else "cossim_act"
    t["x_key"] = t[key].fillna(0.0) if not legacy else t[key]
    # llama-imatrix: by kind, then the key descending; ties broken by layer for a stable order
    t = t.sort_values(
        ["x_kind_b", "x_key", "x_lnum"], ascending=[True, False, True], kind="mergesort"
    )
    return _legacy_text(t, layers, source) if legacy else _preferred_text(t, layers, source, ecs_k)


def _legacy_text(t: pd.DataFrame, layers: pd.DataFrame, source: str) -> str:
    out = [f"\nComputing statistics for {source} ({len(t)} tensors)\n"]
    head = (
        " Layer",
        "       Tensor",
        "          Σ(Act²)",
        "  Min",
        "            Max",
        "           μ",
        "   σ",
        " % Active",
        "N",
        "   Entropy",
        "E (norm)",
        "ZD",
        "  CosSim",
    )
    out.append("\n" + "\t".join(head) + "\n")
    out.append("=" * 169 + "\n")
    for r in _rows(t):
        out.append(
            _LEGACY_ROW
            % (
                r.x_layer_s,
                r.tensor,
                r.sum_sqact,
                r.sqact_min,
                r.sqact_max,
                r.sqact_mean,
                r.sqact_std,
                r.active_pct,
                r.elements,
                r.entropy,
                r.entropy_norm_pct,
                r.zd_pct,
                _z(r.cossim),
            )
        )
    n_layers = int(t.loc[t["x_lnum"] >= 0, "x_lnum"].nunique())
    out.append(f"\nComputing weighted average statistics per layer ({n_layers} layers)\n")
    out.append("\n" + "\t".join(("  Layer", "     μΣ(Act²)", "      μZD", "μCosSim")) + "\n")
    out.append("=" * 48 + "\n")
    for r in _rows(layers):
        out.append(
            _LEGACY_LAYER_ROW % (r.layer, r.wmean_sum_sqact, r.wmean_zd_pct, _z(r.wmean_cossim))
        )
    out.append("\n")
    return "".join(out)


def _preferred_text(t: pd.DataFrame, layers: pd.DataFrame, source: str, ecs_k: float) -> str:
    out = [f"\nComputing tensor statistics for {source} ({len(t)} tensors)\n"]
    widths = (6, 18, 13, 8, 8, 7, 15, 13, 11, 8, 5, 10)
    names = (
        "Layer",
        "Tensor",
        "L₂ Dist",
        "Min",
        "Max",
        "μ",
        "σ",
        "N",
        "H Norm",
        "ECS",
        "ZD",
        "CosSim",
    )
    out.append("\n" + "\t".join(_cs(s, w) for s, w in zip(names, widths, strict=True)) + "\n")
    out.append("=" * 171 + "\n")
    for r in _rows(t):
        h_norm = r.entropy_norm_pct if r.elements > 1 else 0.0
        out.append(
            _PREFERRED_ROW
            % (
                r.x_layer_s,
                _cs(r.tensor, 20, left=True),
                _z(r.l2_dist),
                r.act_min,
                r.act_max,
                r.act_mean,
                r.act_std,
                r.elements,
                h_norm,
                ecs_score(_z(r.l2_dist), _z(r.cossim_act), ecs_k),
                r.act_zd_pct,
                _z(r.cossim_act),
            )
        )
    out.append(f"\nComputing layer statistics ({len(layers)} layers)\n")
    lw = (6, 13, 6, 11, 6)
    out.append(
        "\n"
        + "\t".join(
            _cs(s, w) for s, w in zip(("Layer", "L₂ Dist", "ZD", "CosSim", "ECS"), lw, strict=True)
        )
        + "\n"
    )
    out.append("=" * 57 + "\n")
    for r in _rows(layers):
        l2, cs = _z(r.l2_dist), _z(r.cossim_act)
        out.append(
            _PREFERRED_LAYER_ROW % (r.layer, l2, _z(r.act_zd_pct), cs, ecs_score(l2, cs, ecs_k))
        )
    out.append("\n")
    return "".join(out)


# ---------------------------------------------------------------------------
# comparing two imatrices

#: Parquet schema of ``imatrix compare --parquet`` (one row per tensor in either input).
COMPARE_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("layer", pa.int32()),
        ("tensor", pa.string()),
        ("in_a", pa.bool_()),
        ("in_b", pa.bool_()),
        ("n_mat", pa.int32()),
        ("experts_compared", pa.int32()),
        ("count_a", pa.int64()),
        ("count_b", pa.int64()),
        ("cossim", pa.float64()),
        ("spearman", pa.float64()),
        ("mean_ratio", pa.float64()),
    ]
)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), for Spearman's correlation."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.arange(x.size, dtype=np.float64)
    _, inv, cnt = np.unique(xs, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=np.arange(x.size, dtype=np.float64))
    ranks[order] = (sums / cnt)[inv]
    return ranks


def compare_imatrices(a: ImatrixData, b: ImatrixData) -> pd.DataFrame:
    """How much two imatrices (e.g. from two calibration sets) differ, per tensor.

    Compares per-channel mean squared activations (sum / count, the numbers quantization
    uses) over the experts that fired in both: ``cossim`` (cosine similarity),
    ``spearman`` (rank correlation: do both agree on which channels matter),
    ``mean_ratio`` (mean importance of B over A). Tensors present in only one file get
    a row with the statistics null.
    """
    rows = []
    for name in sorted(set(a.entries) | set(b.entries)):
        layer_s, kind = split_name(name)
        ea, eb = a.entries.get(name), b.entries.get(name)
        r: dict[str, Any] = {
            "name": name,
            "layer": layer_number(layer_s) if layer_s != "-" else None,
            "tensor": kind,
            "in_a": ea is not None,
            "in_b": eb is not None,
            "n_mat": (ea or eb).n_counts,  # type: ignore[union-attr]
            "count_a": int(lround_counts(ea.counts).max()) if ea is not None else None,
            "count_b": int(lround_counts(eb.counts).max()) if eb is not None else None,
            "experts_compared": 0,
        }
        rows.append(r)
        if ea is None or eb is None:
            continue
        if ea.values.size != eb.values.size:
            raise ImatrixError(
                f"tensor '{name}' has {ea.values.size} values in the first imatrix and "
                f"{eb.values.size} in the second: not the same model"
            )
        ca, cb = lround_counts(ea.counts), lround_counts(eb.counts)
        n = max(ca.size, cb.size)
        ca = np.broadcast_to(ca, (n,)) if ca.size == 1 else ca
        cb = np.broadcast_to(cb, (n,)) if cb.size == 1 else cb
        live = (ca > 0) & (cb > 0)
        r["experts_compared"] = int(live.sum())
        if not live.any():
            continue
        ma = (ea.values.reshape(n, -1)[live] / ca[live, None]).reshape(-1)
        mb = (eb.values.reshape(n, -1)[live] / cb[live, None]).reshape(-1)
        r["cossim"] = _cosine(ma, mb)
        ra, rb = _ranks(ma), _ranks(mb)
        r["spearman"] = _cosine(ra - ra.mean(), rb - rb.mean())
        with np.errstate(divide="ignore", invalid="ignore"):
            r["mean_ratio"] = float(mb.mean() / ma.mean())
    return _frame(rows, COMPARE_SCHEMA)


def write_comparison_parquet(cmp: pd.DataFrame, path: str | Path) -> Path:
    """Write :func:`compare_imatrices`' table atomically to ``path``."""
    p = Path(path)
    _write_table(cmp, COMPARE_SCHEMA, p)
    return p


def render_comparison(cmp: pd.DataFrame, a: str, b: str) -> str:
    """A plain table of :func:`compare_imatrices`, most changed tensors first."""
    out = [f"comparing {a} (A) with {b} (B): {len(cmp)} tensors\n\n"]
    out.append(
        f"{'Layer':>5}  {'Tensor':<20}  {'CosSim':>8}  {'Spearman':>8}  {'B/A mean':>9}  "
        f"{'tokens A':>9}  {'tokens B':>9}\n"
    )
    both = cmp[cmp["in_a"] & cmp["in_b"]].sort_values(
        "cossim", kind="mergesort", na_position="first"
    )
    for r in _rows(both):
        layer = "-" if pd.isna(r.layer) else str(int(r.layer))
        out.append(
            f"{layer:>5}  {r.tensor:<20}  {r.cossim:8.4f}  {r.spearman:8.4f}  {r.mean_ratio:9.4f}  "
            f"{int(r.count_a):9d}  {int(r.count_b):9d}\n"
        )
    for r in _rows(cmp[~(cmp["in_a"] & cmp["in_b"])]):
        out.append(f"only in {'A' if r.in_a else 'B'}: {r.name}\n")
    return "".join(out)
