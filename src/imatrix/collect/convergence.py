"""The collector's convergence record (:mod:`imatrix.convergence`) and its stop rule.

Why a tracker of its own: the record needs the means of the previous record point (the
*reference*), and a resumed run must continue from exactly that reference, or its record
(and so its output's bytes, and where ``--until-converged`` stops) would differ from an
uninterrupted run's. The checkpoint therefore carries the record so far and the
reference: explicitly (float32, as the running process keeps it) when the checkpoint is
off a record point, and as "the checkpoint's own data" when it is at one (its means are
then exactly the reference, so the file does not hold the sums twice).
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import numpy as np

from imatrix.collect.checkpoint import CorruptCheckpoint, StartPoint
from imatrix.collect.job import Job
from imatrix.convergence import (
    ConvergenceLog,
    StopRule,
    quantizer_means,
    record_due,
    record_interval,
    summarize,
    tensor_changes,
)
from imatrix.errors import ImatrixError
from imatrix.model import Entry

log = logging.getLogger(__package__)  # one logger name for the whole collector


class ConvergenceTracker:
    """Adds a record every :func:`record_interval` chunks and says when to stop."""

    def __init__(
        self,
        *,
        first: int,
        n_ctx: int,
        output_frequency: int,
        rule: StopRule | None,
        entries: dict[str, Entry],
        state: dict[str, Any] | None = None,
        source: str = "checkpoint",
    ) -> None:
        self.first = first
        self.n_ctx = n_ctx
        self.rule = rule
        self.log = ConvergenceLog(record_interval(output_frequency), rule=rule)
        #: float32 means at the last record point (or the start), and that chunk
        self.reference = {n: quantizer_means(e) for n, e in entries.items()}
        self.reference_chunk: int | None = None
        if state is not None:
            self._restore(state, source)

    # -- the loop's hook ------------------------------------------------------------

    def after_group(self, g0: int, reached: int, entries: dict[str, Entry]) -> bool:
        """Record when the group ``[g0, reached)`` crosses a record boundary; True when
        the stop rule says the collection has converged here."""
        self.log.chunks_used = reached - self.first
        if not record_due(g0, reached, first=self.first, interval=self.log.interval):
            return False
        changes, self.reference = tensor_changes(entries, self.reference)
        self.reference_chunk = reached
        chunks = reached - self.first
        rec = summarize(changes, chunk=reached, chunks=chunks, tokens=chunks * self.n_ctx)
        self.log.records.append(rec)
        log.info(
            "convergence after %d chunks: max 1-cos %.3g (%s), median %.3g",
            chunks,
            rec.max,
            rec.worst,
            rec.median,
        )
        return self._converged()

    def _converged(self) -> bool:
        rule = self.rule
        if rule is None or len(self.log.records) < rule.patience:
            return False
        if all(r.max < rule.eps for r in self.log.records[-rule.patience :]):
            self.log.stopped_at = self.log.records[-1].chunk
            log.info(
                "converged: max 1-cos below %g for %d records; stopping after chunk %d",
                rule.eps,
                rule.patience,
                self.log.stopped_at,
            )
            return True
        return False

    # -- checkpoint state ---------------------------------------------------------

    def state(self, reached: int) -> dict[str, Any]:
        """What a checkpoint at chunk ``reached`` must carry for an exact resume."""
        at_record = self.reference_chunk == reached
        return {
            "log": self.log.to_json(),
            "reference": None if at_record else _encode(self.reference),
        }

    def _restore(self, state: dict[str, Any], source: str) -> None:
        try:
            restored = ConvergenceLog.from_json(state["log"], source)
            ref = state["reference"]
            if ref is not None:
                self.reference = _decode(ref)
        except (ImatrixError, KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpoint(
                f"ignoring {source}: corrupt convergence state ({exc})"
            ) from None
        restored.rule = self.rule
        self.log = restored


def tracker_for(job: Job, start: StartPoint) -> ConvergenceTracker:
    """The tracker of a collection starting at ``start`` (fresh, or resumed with the
    checkpoint's record and reference)."""
    s = job.settings
    if start.resumed_from is not None and start.convergence is None:
        log.warning(
            "%s has no convergence record; the record starts at chunk %d",
            job.checkpoint,
            start.chunk,
        )
    return ConvergenceTracker(
        first=job.plan.first,
        n_ctx=job.plan.n_ctx,
        output_frequency=s.output_frequency,
        rule=s.until_converged,
        entries=start.entries,
        state=start.convergence,
        source=str(job.checkpoint),
    )


def _encode(ref: dict[str, np.ndarray]) -> dict[str, Any]:
    return {
        n: {"shape": list(m.shape), "f4": base64.b64encode(m.astype("<f4").tobytes()).decode()}
        for n, m in sorted(ref.items())
    }


def _decode(doc: dict[str, Any]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for n, d in doc.items():
        arr = np.frombuffer(base64.b64decode(d["f4"], validate=True), dtype="<f4")
        out[n] = arr.astype(np.float32).reshape(tuple(int(x) for x in d["shape"]))
    return out


__all__ = ["ConvergenceTracker", "tracker_for"]
