"""The collector: importance matrices through llama.cpp's eval callback, as llama-imatrix.

:func:`collect` is a short sequence of steps, each in a module of its own:

1. plan (:mod:`.plan`, :mod:`.job`): load the tokens, split them into chunks and
   groups of parallel sequences as ``compute_imatrix`` in tools/imatrix/imatrix.cpp
   does (BOS, ``--chunk``/``--chunks``, sequences per batch), fix the provenance and
   the signature a checkpoint must match;
2. resume (:mod:`.checkpoint`): from ``<output>.checkpoint`` when asked to and it is
   sound, else from the start (or from ``--in-file`` data);
3. decode groups (:mod:`.loop`): each group of chunks goes through ``llama_decode``
   with the eval callback (:mod:`.collector`) adding input activations to float64
   accumulators (:mod:`.accumulate`); graphs may stop after the last needed tensor
   (:mod:`.graph_cut`); perplexity as llama-imatrix computes it;
4. checkpoint (:mod:`.checkpoint`): every ``output_frequency`` chunks; the float64
   sums are rounded to the file's float32 at each checkpoint, in the running process
   too, so that a resumed run writes exactly the bytes an uninterrupted one would;
5. finish: the output is written once, atomically, at the end; then the checkpoint
   goes. Chunk counts in files follow llama.cpp (``max count // chunk size``).

On SIGTERM (SLURM's warning before a preemption's or time limit's SIGKILL) a
collection that writes an output finishes the group of chunks in flight, writes its
checkpoint and raises :class:`Terminated`, a ``SystemExit`` with status 143
(:mod:`.termination`); SIGINT stops at once (``KeyboardInterrupt``).

While it runs, a collection holds ``<output>.lock`` (:mod:`imatrix.writelock`): a
second collector of the same output (a rerun while an orphaned job still runs) waits
for it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from imatrix import faults
from imatrix.atomic import check_writable, remove_stale_temporaries
from imatrix.collect.checkpoint import (
    KEY_CHECKPOINT_STATE,
    CorruptCheckpoint,
    StaleCheckpoint,
    checkpoint_path,
    load_checkpoint,
    start_point,
)
from imatrix.collect.collector import Collector
from imatrix.collect.job import Job, prepare_job
from imatrix.collect.loop import ChunkCallback, LoopStats, run_chunks
from imatrix.collect.plan import plan_batches
from imatrix.collect.settings import CollectResult, CollectSettings
from imatrix.collect.termination import (
    TERMINATED_EXIT_CODE,
    StopRequest,
    Terminated,
    finish_on_sigterm,
)
from imatrix.formats import (
    FORMAT_DAT,
    FORMAT_GGUF,
    write_imatrix,
)
from imatrix.model import ImatrixData, Provenance
from imatrix.perplexity import Perplexity
from imatrix.writelock import exclusive_writer

log = logging.getLogger(__name__)


def collect(
    model: str | Path,
    tokens: str | Path | np.ndarray,
    output: str | Path | None = None,
    settings: CollectSettings | None = None,
    *,
    dataset: str | None = None,
    provenance: Provenance | None = None,
    in_data: ImatrixData | None = None,
    on_chunk: ChunkCallback | None = None,
) -> CollectResult:
    """Collect an importance matrix over chunks ``[first_chunk, last_chunk)`` of ``tokens``.

    ``tokens``: the whole dataset's tokens (a ``.npy`` from
    :func:`imatrix.tokenize.tokenize_file`, or an int32 array); chunk ``k`` is
    ``tokens[k*n_ctx:(k+1)*n_ctx]``. ``settings``: see :class:`CollectSettings`.
    ``dataset`` is recorded in ``imatrix.datasets`` (default: the text path recorded
    beside a tokens file, else that file's path; nothing for an array). ``in_data``:
    loaded imatrix data to continue from (``--in-file`` with ``-f``). ``provenance``:
    model/dataset sha256 and tokenizer settings to record. ``on_chunk(k,
    running_ppl)`` is called after each chunk.

    Writes ``output`` (atomically, once, at the end), ``<output>.checkpoint`` and
    ``<output>.at_<n>`` snapshots as the settings ask.
    """
    t0 = time.perf_counter()
    s = settings or CollectSettings()
    job = prepare_job(
        model, tokens, output, s, dataset=dataset, provenance=provenance, base=in_data
    )
    if output is not None:
        check_writable(output)  # now, not after hours of work
    # one writer per output (a rerun while an orphaned job still runs waits for it)
    with exclusive_writer(output) if output is not None else contextlib.nullcontext():
        _remove_temporaries(job)
        start = start_point(
            job.checkpoint,
            job.signature,
            resume=s.resume,
            first=job.plan.first,
            base=in_data,
            compute_ppl=s.compute_ppl,
        )
        # held through the final write too: a SIGTERM then lets the finished run complete
        with finish_on_sigterm() if output is not None else _no_stop() as stop:
            collector, stats = run_chunks(job, start, on_chunk, stop)
            data = _finish(job, collector, stats)
        _log_perplexity(start.ppl, quiet=on_chunk is not None)
        return CollectResult(
            data=data,
            perplexity=start.ppl,
            first_chunk=job.plan.first,
            last_chunk=stats.end_chunk,
            n_tokens=stats.n_tokens,
            seconds=time.perf_counter() - t0,
            compute_seconds=stats.compute_seconds,
            collect_seconds=collector.seconds,
            ppl_seconds=stats.ppl_seconds,
            stopped_early=collector.stop_after is not None,
            resumed_from=start.resumed_from,
            outputs=stats.outputs,
            convergence=None if stats.convergence is None else stats.convergence.log,
            aborted_decodes=stats.aborted_decodes,
        )


@contextlib.contextmanager
def _no_stop() -> Iterator[StopRequest]:
    """Without an output there is nothing to save: SIGTERM keeps its default action."""
    yield StopRequest()


def _remove_temporaries(job: Job) -> None:
    """Temporary files of killed writers of the output and its checkpoint."""
    if job.output is None or job.checkpoint is None:
        return
    n_stale = remove_stale_temporaries(job.output) + remove_stale_temporaries(job.checkpoint)
    if n_stale:
        log.info("removed %d temporary file(s) left by an interrupted run", n_stale)


def _finish(job: Job, collector: Collector, stats: LoopStats) -> ImatrixData:
    """The final data; written to the output, after which the checkpoint goes."""
    conv = stats.convergence
    data = job.data(collector.entries(), None, None if conv is None else conv.log.to_json())
    if job.output is not None:
        s = job.settings
        write_imatrix(data, job.output, output_format=s.output_format, compat=s.compat)
        stats.outputs.append(Path(job.output))
        faults.point("collect.done")
        if job.checkpoint is not None:
            job.checkpoint.unlink(missing_ok=True)
    return data


def _log_perplexity(ppl: Perplexity | None, *, quiet: bool) -> None:
    if ppl is None or ppl.ppl is None:
        return
    err = ppl.error
    (log.debug if quiet else log.info)(
        "final estimate: PPL = %.4f +/- %s", ppl.ppl, "n/a" if err is None else f"{err:.5f}"
    )


__all__ = [
    "FORMAT_DAT",
    "FORMAT_GGUF",
    "KEY_CHECKPOINT_STATE",
    "TERMINATED_EXIT_CODE",
    "CollectResult",
    "CollectSettings",
    "Collector",
    "CorruptCheckpoint",
    "StaleCheckpoint",
    "Terminated",
    "checkpoint_path",
    "collect",
    "load_checkpoint",
    "plan_batches",
]
