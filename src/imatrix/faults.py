"""Deterministic crash points for the reliability tests (``IMATRIX_FAULT``).

Why in the library: "a killed run loses nothing" can only be proven by killing the
real process at the moments that matter (between two chunks, while a checkpoint or
the output is half written, between the output's rename and the checkpoint's
removal), and those moments are microseconds wide: an outside ``kill`` cannot hit
them on purpose. So the library names them, and a test sets::

    IMATRIX_FAULT=<point>[:<file glob>][@<n>][=kill|=stop]

The ``n``-th time (default 1) the process passes ``<point>`` (for the ``write.*``
points: while writing a file whose name matches the glob) it sends itself SIGKILL,
which is what a preemption, an OOM kill or a dead node does to a job: no handler
runs, nothing is flushed or cleaned up. ``=stop`` sends SIGSTOP instead: the
process freezes there holding whatever it holds (its files, its locks) until it
gets SIGCONT, for tests that need a live but stalled writer.

Outside tests the variable is unset and a point costs one dictionary lookup.
"""

from __future__ import annotations

import fnmatch
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path

from imatrix.errors import ImatrixError

ENV = "IMATRIX_FAULT"

#: every point the library passes, and where
POINTS = {
    "collect.chunk": "the chunks of one batch are accumulated; no save has happened yet",
    "collect.checkpointed": "a checkpoint has just been written",
    "collect.done": "the output is in place; the checkpoint has not been removed yet",
    "write.partial": "half of a file's bytes are in its temporary file",
    "write.complete": "the temporary file is complete, not yet synced or renamed",
    "write.renamed": "the file is in place under its final name; directory not yet synced",
}

_SPEC_RE = re.compile(
    r"^(?P<point>[a-z.]+)(?::(?P<glob>[^@=]+))?(?:@(?P<n>[1-9][0-9]*))?(?:=(?P<action>kill|stop))?$"
)


@dataclass(frozen=True)
class FaultSpec:
    point: str
    glob: str | None = None
    n: int = 1
    action: str = "kill"


def parse(spec: str) -> FaultSpec:
    """``IMATRIX_FAULT``'s value as a :class:`FaultSpec`; an unknown point is an error
    (a typo must not turn a crash test into one that silently never crashes)."""
    m = _SPEC_RE.match(spec.strip())
    if m is None:
        raise ImatrixError(f"{ENV}={spec!r}: expected <point>[:<file glob>][@<n>][=kill|=stop]")
    point = m.group("point")
    if point not in POINTS:
        raise ImatrixError(f"{ENV}={spec!r}: unknown point '{point}' (known: {', '.join(POINTS)})")
    return FaultSpec(point, m.group("glob"), int(m.group("n") or 1), m.group("action") or "kill")


_state: dict[str, object] = {"spec": None, "raw": None, "hits": 0}


def point(name: str, path: str | Path | None = None) -> None:
    """Pass the crash point ``name`` (while writing ``path``, for file points)."""
    raw = os.environ.get(ENV)
    if not raw:
        return
    if raw != _state["raw"]:
        _state.update(spec=parse(raw), raw=raw, hits=0)
    spec = _state["spec"]
    assert isinstance(spec, FaultSpec)
    if spec.point != name:
        return
    if spec.glob is not None and (path is None or not fnmatch.fnmatch(Path(path).name, spec.glob)):
        return
    hits = int(_state["hits"]) + 1  # type: ignore[call-overload]
    _state["hits"] = hits
    if hits == spec.n:
        os.kill(os.getpid(), signal.SIGSTOP if spec.action == "stop" else signal.SIGKILL)


__all__ = ["ENV", "POINTS", "FaultSpec", "parse", "point"]
