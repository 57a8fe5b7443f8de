"""Where a graph may stop early: found by a probe, confirmed on the first real decode.

llama-imatrix asks for the logits of every token, so on a large vocabulary the output
projection costs more than the rest of the model. When nothing needs logits (no
perplexity, no ``output.weight``), the eval callback returns false right after the
last tensor the imatrix needs: the scheduler stops the current graph split there and
the output projection is never computed. Stopping is safe for the KV cache: a layer
writes it in its attention, before its FFN. Later graph splits (with ``-ngl``
offloading) still run; they compute only what comes after the last needed tensor.

Which tensor is last is learnt in two steps, one explicit :class:`Mode` at a time:

- ``PROBE``: a small decode (a few dozen tokens, at least 16 so that every
  ``MUL_MAT`` is needed) records the needed tensors in graph order; nothing is
  accumulated. Stopping is armed after the last one when each occurred once, each
  covered every token, and no ``MUL_MAT`` was skipped for too few rows. Where the
  decode can be aborted (CPU only), the probe ends at the output projection, which
  costs more than the rest of a few dozen rows on a large vocabulary: the scheduler
  asks about every node of the graph before it computes the piece they form, so a
  needed node after the projection is still seen, and disarms stopping.
- ``VERIFY``: the first real decode must show every probed tensor covering every
  token of that decode; if one did not (the real graphs differ from the probe's), the
  caller undoes that decode, stopping is disarmed for good, and the decode is run
  again in full.
- ``COLLECT``: everything else; the callback only accumulates.
"""

from __future__ import annotations

import enum
import logging

log = logging.getLogger(__package__)  # one logger name for the whole collector


class Mode(enum.Enum):
    """What the eval callback does with an observed node (one mode at a time)."""

    COLLECT = "collect"  # accumulate
    PROBE = "probe"  # record the needed tensors in graph order; accumulate nothing
    VERIFY = "verify"  # accumulate, and count each tensor's rows to confirm the probe


class GraphCut:
    """The probe/verify state machine and the tensor after which graphs stop."""

    def __init__(self) -> None:
        self.mode = Mode.COLLECT
        #: None: never stop a graph early; else the tensor after which the callback
        #: returns false
        self.stop_after: str | None = None
        self._seq: list[str] = []
        self._rows: dict[str, int] = {}
        self._small = False
        self._head = False
        self._past_head = False

    @property
    def sequence(self) -> tuple[str, ...]:
        """The needed tensors the probe saw, in graph order."""
        return tuple(self._seq)

    def _enter(self, expected: Mode, new: Mode) -> None:
        if self.mode is not expected:
            raise RuntimeError(f"graph cut: cannot go to {new.name} from {self.mode.name}")
        self.mode = new

    def record(self, name: str, rows: int) -> None:
        """A needed node was observed covering ``rows`` tokens (PROBE and VERIFY)."""
        if self.mode is Mode.PROBE:
            self._seq.append(name)
        self._rows[name] = self._rows.get(name, 0) + rows

    def saw_small(self) -> None:
        """A needed ``MUL_MAT`` was skipped for having too few rows (PROBE only)."""
        if self.mode is Mode.PROBE:
            self._small = True

    def saw_head(self) -> bool:
        """The output projection was asked about (PROBE only): True the first time, when
        the caller may end the probe's decode there."""
        if self.mode is not Mode.PROBE or self._head:
            return False
        self._head = True
        return True

    def asked_needed(self) -> None:
        """A needed node was asked about (PROBE only): after the output projection it
        would go unseen if the probe ended there, so stopping is not armed."""
        if self.mode is Mode.PROBE and self._head:
            self._past_head = True

    def start_probe(self) -> None:
        self._enter(Mode.COLLECT, Mode.PROBE)
        self._seq, self._rows, self._small = [], {}, False
        self._head = self._past_head = False

    def finish_probe(self, n_tokens: int) -> bool:
        """Arm stopping after the probe's last needed tensor if the probe shows it is safe."""
        self._enter(Mode.PROBE, Mode.COLLECT)
        seq, rows = self._seq, self._rows
        if self._past_head:
            log.debug("graphs are not cut early: a needed tensor follows the output projection")
            return False
        if not seq or self._small or len(set(seq)) != len(seq):
            log.debug("graphs are not cut early: probe saw %s", seq)
            return False
        if any(r != n_tokens for r in rows.values()):
            log.debug("graphs are not cut early: probe rows %s", rows)
            return False
        self.stop_after = seq[-1]
        log.debug("graphs will stop after '%s' (nothing needs the rest)", self.stop_after)
        return True

    def start_verify(self) -> None:
        self._enter(Mode.COLLECT, Mode.VERIFY)
        self._rows = {}

    def finish_verify(self, n_tokens: int) -> bool:
        """True when the decode covered every probed tensor fully; else disarm for good."""
        self._enter(Mode.VERIFY, Mode.COLLECT)
        short = {n: self._rows.get(n, 0) for n in sorted(set(self._seq))}
        short = {n: r for n, r in short.items() if r != n_tokens}
        if not short:
            return True
        self.stop_after = None
        log.debug("graphs differ from the probe (%s); running them in full", short)
        return False


__all__ = ["GraphCut", "Mode"]
