"""SIGTERM: finish the chunks in flight, checkpoint, exit with status 143.

Why: SLURM sends SIGTERM before SIGKILL (a preemption's grace time, or a time limit
with ``--signal``), as do ``docker stop``, systemd and Kubernetes. Python's default
would end the process at once and lose up to ``output_frequency`` chunks of work.
While :func:`collect <imatrix.collect.collect>` writes an output, a SIGTERM only sets
a flag (:func:`finish_on_sigterm`); the chunk loop sees it when the group of chunks
being decoded is done, writes ``<output>.checkpoint`` (exact: the resumed run ends
byte-identical to an uninterrupted one) and raises :class:`Terminated`.

``Terminated`` is a :class:`SystemExit` with status 143 (128 + SIGTERM, what shells
report for a process SIGTERM ended): uncaught, it ends any process (the CLI, a
workflow job's script) with that status and no traceback, cleanup included (the
output's lock is released, the model freed). A non-zero status is what makes
Snakemake resubmit the job (``retries``) and SLURM record a failure; the resubmitted
job resumes from the checkpoint. SIGINT (Ctrl-C) is left alone: it stops at once
with :class:`KeyboardInterrupt` (the CLI exits 130) and keeps the last periodic
checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

#: exit status after a SIGTERM (128 + 15, as a shell reports a SIGTERM'd process)
TERMINATED_EXIT_CODE = 128 + signal.SIGTERM


class Terminated(SystemExit):
    """A collection stopped by SIGTERM after chunk ``reached``, saved in ``checkpoint``."""

    def __init__(self, reached: int, checkpoint: Path | None) -> None:
        super().__init__(TERMINATED_EXIT_CODE)
        self.reached = reached
        self.checkpoint = checkpoint


@dataclass
class StopRequest:
    """Set by the SIGTERM handler; read by the chunk loop between groups."""

    requested: bool = False


@contextlib.contextmanager
def finish_on_sigterm() -> Iterator[StopRequest]:
    """Turn SIGTERM into a :class:`StopRequest` for the duration.

    Only from the main thread (where Python runs signal handlers) and only when
    SIGTERM has its default action: a program that handles SIGTERM itself keeps its
    handler. The previous handler is restored on exit.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        yield request
        return

    def handler(_signum: int, _frame: FrameType | None) -> None:
        request.requested = True  # nothing else: this may run inside the eval callback

    signal.signal(signal.SIGTERM, handler)
    try:
        yield request
    finally:
        signal.signal(signal.SIGTERM, previous)


__all__ = ["TERMINATED_EXIT_CODE", "StopRequest", "Terminated", "finish_on_sigterm"]
