"""How much an imatrix still changes while it is collected, and when to call it converged.

Why: collecting a large model takes days; once more text no longer moves the importance
values, the rest of the run buys nothing. The collector therefore keeps a *record*:
every :func:`record_interval` chunks it compares the mean squared activations it would
store now with those of the previous record point.

The measure, per weight tensor and per expert with a count > 0: ``1 − cos(a, b)``
between the vector the quantizer would use now (``sum / count`` per input channel, in
float32, exactly :meth:`imatrix.model.ImatrixData.means`) and the one at the previous
record point. Where the previous point had no data (the start of a collection, a
tensor not yet seen, an expert not yet routed to) the previous vector is what
llama-quantize uses for missing data, all ones; with ``--in-file`` data the start is
that data. A record holds the maximum and the median over every (tensor, expert) pair
compared, and per tensor the largest change of its experts.

The rule (:func:`converged_at`), used by ``collect --until-converged EPS[:PATIENCE]``
and by ``stats``: the collection has converged at the first record that ends a run of
PATIENCE consecutive records whose maximum is below EPS. ``stats`` applies it with
:data:`DEFAULT_EPS` and :data:`DEFAULT_PATIENCE` unless told otherwise, so its
"converged after N tokens" is where ``--until-converged`` with the same numbers stops.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imatrix.errors import ImatrixError
from imatrix.model import Entry

#: a record every min(-ofreq, this) chunks (this when -ofreq is 0: no checkpoints)
MAX_RECORD_INTERVAL = 8
#: ``stats``' default threshold on the largest change between two records
DEFAULT_EPS = 1e-3
#: consecutive records below EPS (``--until-converged EPS`` without ``:PATIENCE``)
DEFAULT_PATIENCE = 2
#: version of the JSON layout stored under ``imatrix_pipeline.convergence``
RECORD_FORMAT = 1


def record_interval(output_frequency: int) -> int:
    """Chunks between two records: ``min(-ofreq, 8)``, and 8 when ``-ofreq`` is 0 (or
    negative: never checkpointing)."""
    if output_frequency <= 0:
        return MAX_RECORD_INTERVAL
    return min(output_frequency, MAX_RECORD_INTERVAL)


def record_due(g0: int, reached: int, *, first: int, interval: int) -> bool:
    """Whether the group of chunks ``[g0, reached)`` crosses a multiple of ``interval``
    chunks counted from ``first``. Chunks decoded side by side in one group cannot be
    told apart, so a record lands at the end of the group that crosses the boundary."""
    return (reached - first) // interval > (g0 - first) // interval


@dataclass(frozen=True)
class StopRule:
    """``--until-converged EPS[:PATIENCE]``."""

    eps: float
    patience: int = DEFAULT_PATIENCE

    def as_dict(self) -> dict[str, Any]:
        return {"eps": self.eps, "patience": self.patience}


def parse_stop_rule(text: str) -> StopRule:
    """``EPS`` or ``EPS:PATIENCE`` (EPS > 0, PATIENCE ≥ 1); :class:`ValueError` otherwise."""
    eps_s, sep, pat_s = text.partition(":")
    try:
        eps = float(eps_s)
        patience = int(pat_s) if sep else DEFAULT_PATIENCE
    except ValueError:
        raise ValueError(f"'{text}' is not EPS or EPS:PATIENCE (e.g. 1e-4 or 1e-4:3)") from None
    return check_stop_rule(eps, patience)


def check_stop_rule(eps: float, patience: int) -> StopRule:
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"EPS must be a positive number, got {eps}")
    if patience < 1:
        raise ValueError(f"PATIENCE must be at least 1, got {patience}")
    return StopRule(float(eps), int(patience))


@dataclass(frozen=True)
class Record:
    """One point of the record: the chunk reached (absolute index), chunks and tokens
    collected by this run so far, the largest and median change, the tensor with the
    largest change, and per tensor its change (None: not compared)."""

    chunk: int
    chunks: int
    tokens: int
    max: float
    median: float
    worst: str | None
    per_tensor: dict[str, float | None]

    def summary_dict(self) -> dict[str, Any]:
        """Every field but ``per_tensor``, by name in declaration order: the stored
        record and the convergence table both list them so."""
        return {
            "chunk": self.chunk,
            "chunks": self.chunks,
            "tokens": self.tokens,
            "max": self.max,
            "median": self.median,
            "worst": self.worst,
        }


@dataclass
class ConvergenceLog:
    """The record of one collection, as stored in the imatrix and its checkpoint."""

    interval: int
    records: list[Record] = field(default_factory=list)
    rule: StopRule | None = None
    #: chunks this run collected; and the chunk it stopped at when the rule stopped it
    chunks_used: int = 0
    stopped_at: int | None = None

    def converged_at(self, rule: StopRule) -> Record | None:
        return converged_at(self.records, rule)

    def to_json(self) -> str:
        names = sorted({n for r in self.records for n in r.per_tensor})
        doc: dict[str, Any] = {
            "format": RECORD_FORMAT,
            "interval": self.interval,
            "rule": None if self.rule is None else self.rule.as_dict(),
            "chunks_used": self.chunks_used,
            "stopped_at": self.stopped_at,
            "tensors": names,
            "records": [_record_doc(r, names) for r in self.records],
        }
        return json.dumps(doc, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, text: str, source: str) -> ConvergenceLog:
        try:
            doc = json.loads(text)
            names = list(doc["tensors"])
            rule = doc.get("rule")
            return cls(
                interval=int(doc["interval"]),
                records=[_record_from(r, names) for r in doc["records"]],
                rule=None if rule is None else check_stop_rule(rule["eps"], rule["patience"]),
                chunks_used=int(doc.get("chunks_used", 0)),
                stopped_at=doc.get("stopped_at"),
            )
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise ImatrixError(f"{source}: unreadable convergence record ({exc})") from None


def _record_doc(r: Record, names: list[str]) -> dict[str, Any]:
    return {**r.summary_dict(), "per_tensor": [r.per_tensor.get(n) for n in names]}


def _record_from(d: dict[str, Any], names: list[str]) -> Record:
    per = d["per_tensor"]
    if len(per) != len(names):
        raise ValueError(f"{len(per)} per-tensor values for {len(names)} tensors")
    return Record(
        chunk=int(d["chunk"]),
        chunks=int(d["chunks"]),
        tokens=int(d["tokens"]),
        max=float(d["max"]),
        median=float(d["median"]),
        worst=d["worst"],
        per_tensor={n: (None if v is None else float(v)) for n, v in zip(names, per, strict=True)},
    )


def converged_at(records: list[Record], rule: StopRule) -> Record | None:
    """The first record ending ``rule.patience`` consecutive records whose maximum is
    below ``rule.eps`` (None: not converged by that rule)."""
    run = 0
    for r in records:
        run = run + 1 if r.max < rule.eps else 0
        if run >= rule.patience:
            return r
    return None


# ---------------------------------------------------------------------------
# the measure


def quantizer_means(e: Entry) -> np.ndarray:
    """``[n_counts, row]`` float32 means as the quantizer gets them (1.0 without data)."""
    vals = e.values.astype(np.float32).reshape(e.n_counts, e.row_size)
    counts = np.round(e.counts).astype(np.float32)
    out = np.ones_like(vals)
    live = counts > 0
    out[live] = vals[live] / counts[live, None]
    return out


def cosine_change(now: np.ndarray, before: np.ndarray) -> np.ndarray:
    """``1 − cos`` row by row, in float64, clipped to [0, 2] (rounding can dip below 0).
    A zero row has no direction: no change against another zero row, 1 otherwise."""
    a = now.astype(np.float64)
    b = before.astype(np.float64)
    dot = np.einsum("ij,ij->i", a, b)
    na = np.sqrt(np.einsum("ij,ij->i", a, a))
    nb = np.sqrt(np.einsum("ij,ij->i", b, b))
    denom = na * nb
    with np.errstate(invalid="ignore", divide="ignore"):
        change = 1.0 - dot / denom
    zero = denom == 0
    change[zero] = np.where((na == 0) & (nb == 0), 0.0, 1.0)[zero]
    return np.asarray(np.clip(change, 0.0, 2.0))


def tensor_changes(
    entries: dict[str, Entry], reference: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per tensor: the changes of its experts with a count > 0 against ``reference``
    (previous means; ones where absent or shaped otherwise), and its means now."""
    changes: dict[str, np.ndarray] = {}
    means: dict[str, np.ndarray] = {}
    for name in sorted(entries):
        e = entries[name]
        now = quantizer_means(e)
        means[name] = now
        before = reference.get(name)
        if before is None or before.shape != now.shape:
            before = np.ones_like(now)
        live = np.round(e.counts) > 0
        changes[name] = cosine_change(now[live], before[live])
    return changes, means


def summarize(changes: dict[str, np.ndarray], *, chunk: int, chunks: int, tokens: int) -> Record:
    """A record from per-tensor changes: max and median over every pair compared."""
    per = {n: (float(c.max()) if c.size else None) for n, c in changes.items()}
    flat = np.concatenate([c for c in changes.values() if c.size] or [np.zeros(0)])
    compared = {n: v for n, v in per.items() if v is not None}
    worst = max(compared, key=lambda n: compared[n]) if compared else None
    return Record(
        chunk=chunk,
        chunks=chunks,
        tokens=tokens,
        max=float(flat.max()) if flat.size else 0.0,
        median=float(np.median(flat)) if flat.size else 0.0,
        worst=worst,
        per_tensor=per,
    )


__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_PATIENCE",
    "MAX_RECORD_INTERVAL",
    "ConvergenceLog",
    "Record",
    "StopRule",
    "check_stop_rule",
    "converged_at",
    "cosine_change",
    "parse_stop_rule",
    "quantizer_means",
    "record_due",
    "record_interval",
    "summarize",
    "tensor_changes",
]
