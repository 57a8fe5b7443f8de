"""The chunk loop: decode each group of chunks, score perplexity, save on schedule.

Speed, besides the graph cut (:mod:`imatrix.collect.graph_cut`): perplexity is
computed on the logits in bulk and split across threads
(:mod:`imatrix.perplexity`), and helper threads do numpy work while llama.cpp waits.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imatrix import faults
from imatrix.collect.checkpoint import StartPoint, checkpoint_due, exact_sums, write_checkpoint
from imatrix.collect.collector import MIN_ROWS, Collector
from imatrix.collect.convergence import ConvergenceTracker, tracker_for
from imatrix.collect.job import Job
from imatrix.collect.plan import BatchSpec
from imatrix.collect.settings import CollectSettings
from imatrix.collect.termination import StopRequest, Terminated
from imatrix.errors import ImatrixError
from imatrix.formats import write_imatrix
from imatrix.llama_api import (
    Batch,
    Context,
    Model,
    default_threads,
    gpu_offload_supported,
    load_model,
)
from imatrix.perplexity import Perplexity, token_nll

log = logging.getLogger(__package__)  # one logger name for the whole collector

#: ``on_chunk(k, running_ppl)``: called after each chunk
ChunkCallback = Callable[[int, float | None], None]


@dataclass
class LoopStats:
    """What the loop measured and wrote besides the output."""

    n_tokens: int = 0
    compute_seconds: float = 0.0
    ppl_seconds: float = 0.0
    outputs: list[Path] = field(default_factory=list)
    #: the convergence record; the chunk the loop ended at (``until_converged`` may end
    #: it before the plan's last)
    convergence: ConvergenceTracker | None = None
    end_chunk: int = 0
    #: decodes ended by aborting them past the last needed tensor
    aborted_decodes: int = 0


@dataclass(frozen=True)
class ThreadPlan:
    #: llama.cpp's threads, and helper threads + 1 for numpy work
    n_threads: int
    #: threads summing activations in the callback
    sum_threads: int
    reuse_inputs: bool


def thread_plan(settings: CollectSettings) -> ThreadPlan:
    """Helper threads do perplexity always; the callback's sums only with a GPU, since
    on the CPU backend llama.cpp's own (OpenMP) threads spin for a while after each
    graph piece and would share the cores with ours. A build that can offload may move
    work to the GPU even with -ngl 0 (op offload), and then the scheduler writes
    copies of inputs the callback is never asked about: no shared-input reuse there."""
    n = settings.threads if settings.threads and settings.threads > 0 else default_threads()
    cpu_only = not gpu_offload_supported()
    reuse = cpu_only if settings.reuse_inputs is None else settings.reuse_inputs
    sum_threads = (1 if cpu_only else n) if settings.sum_threads is None else settings.sum_threads
    return ThreadPlan(n, sum_threads, reuse)


def run_chunks(
    job: Job,
    start: StartPoint,
    on_chunk: ChunkCallback | None,
    stop: StopRequest,
    collector_type: type[Collector] = Collector,
) -> tuple[Collector, LoopStats]:
    """Load the model, decode chunks ``[start.chunk, last)`` into a collector; on a
    ``stop`` request, checkpoint after the group in flight and raise :class:`Terminated`.
    ``collector_type``: a subclass for measurements (the benchmark's do-nothing one)."""
    s = job.settings
    threads = thread_plan(s)
    pool = ThreadPoolExecutor(threads.n_threads - 1) if threads.n_threads > 1 else None
    collector = collector_type(
        process_output=s.process_output,
        entries=start.entries,
        trace=s.verbosity >= 2,
        threads=threads.sum_threads,
        reuse_inputs=threads.reuse_inputs,
        pool=pool,
        with_sums=s.keeps_sums,
    )
    with (
        _shutdown(pool),
        contextlib.closing(collector),
        load_model(job.model, n_gpu_layers=s.n_gpu_layers) as m,
    ):
        if m.add_eos:
            raise ImatrixError(
                f"{job.model}: the model adds EOS tokens; llama-imatrix refuses such models"
            )
        plan = job.plan
        with Context(
            m,
            n_ctx=plan.n_kv,
            n_batch=plan.n_batch,
            n_ubatch=s.n_ubatch,
            n_seq_max=plan.n_seq,
            n_threads=threads.n_threads,
            cb_eval=collector,
        ) as ctx:
            loop = ChunkLoop(job, ctx, collector, start.ppl, pool, threads.n_threads, stop)
            loop.stats.convergence = tracker_for(job, start)
            loop.run(m, start.chunk, on_chunk)
    return collector, loop.stats


class ChunkLoop:
    """Decodes groups of chunks into a collector; checkpoints and snapshots on schedule."""

    def __init__(
        self,
        job: Job,
        ctx: Context,
        collector: Collector,
        ppl: Perplexity | None,
        pool: ThreadPoolExecutor | None,
        n_threads: int,
        stop: StopRequest | None = None,
    ) -> None:
        self.job = job
        self.stop = stop or StopRequest()
        self.ctx = ctx
        self.collector = collector
        self.ppl = ppl
        self.pool = pool
        self.n_threads = n_threads
        self.batch = Batch(job.plan.n_batch)
        self.stats = LoopStats()
        self._bar: Any = None
        self._cc_prev = 0

    def run(self, model: Model, start: int, on_chunk: ChunkCallback | None) -> None:
        plan = self.job.plan
        if plan.n_kv > model.n_ctx_train:
            log.warning(
                "model was trained on only %d context tokens (%d specified)",
                model.n_ctx_train,
                plan.n_kv,
            )
        total = plan.last - start
        log.info(
            "computing over %d chunks (%d to %d), n_ctx=%d, batch_size=%d, n_seq=%d",
            total,
            start,
            plan.last,
            plan.n_ctx,
            plan.n_batch,
            plan.n_seq,
        )
        bos = model.bos if model.add_bos else None
        self.stats.end_chunk = plan.last
        self._bar = _progress(total * plan.n_ctx, self.job.settings.progress)
        t_loop = time.perf_counter()  # the probe is part of the work
        verify = self.job.settings.may_stop_early and self.probe(plan.chunk(start), bos)
        aborted_before = self.ctx.n_aborted  # the probe's abort is not a chunk decode's
        try:
            for g0, n in plan.groups(start):
                tg = time.perf_counter()
                nll = self.decode_group(g0, n, bos, verify)
                verify = False
                if g0 == start:
                    dt = time.perf_counter() - tg
                    eta = dt * math.ceil(total / plan.n_seq)
                    log.info("%.2f seconds per pass - ETA %s", dt, _fmt_eta(eta))
                if self.after_group(g0, n, nll, on_chunk):
                    break  # converged
        finally:
            if self._bar is not None:
                self._bar.close()
        self.ctx.synchronize()
        self.stats.compute_seconds = time.perf_counter() - t_loop
        self.stats.aborted_decodes = self.ctx.n_aborted - aborted_before
        log.debug(
            "%d tensors observed, %d of them reused a shared input's sums",
            self.collector.n_observed,
            self.collector.n_reused,
        )
        log.debug("%d of the reuses needed no graph split of their own", self.collector.n_unsplit)

    def probe(self, chunk: np.ndarray, bos: int | None) -> bool:
        """Decode a few tokens of ``chunk`` to find the last tensor a graph needs (see
        :mod:`imatrix.collect.graph_cut`); the context is cleared afterwards. True when
        stopping is armed. Where decodes may be aborted, the probe's decode ends at the
        output projection."""
        n = min(2 * MIN_ROWS, chunk.size, self.batch.capacity, self.ctx.n_ubatch)
        if n < MIN_ROWS:
            return False
        toks = chunk[:n].copy()
        if bos is not None:
            toks[0] = bos
        if self._abort_allowed():
            self.ctx.enable_abort()
            self.collector.on_head = self.ctx.abort_decode
        self.collector.start_probe()
        aborted = self.ctx.n_aborted
        try:
            self.ctx.clear()
            self.ctx.decode_tokens(self.batch, toks, np.arange(n, dtype=np.int32), 0, True)
        finally:
            self.collector.on_head = None
            if self.ctx.n_aborted > aborted:
                log.debug("the probe's decode ended at the output projection")
            armed = self.collector.finish_probe(n)
            self.ctx.clear()
        return armed

    @staticmethod
    def _abort_allowed() -> bool:
        """Decodes may end by abort where only the CPU computes: with a GPU the graph
        has later splits, and a piece's stop alone does the job. On the CPU, the
        piece's stop alone still has llama.cpp copy out ``n_vocab`` floats per token
        (and clear that buffer first), the largest cost left in a ``--no-ppl`` run.
        Which groups qualify: :meth:`ChunkPlan.abort_split`."""
        return not gpu_offload_supported()

    def _per_decode(self, n: int) -> int:
        """Sequences per decode of a group of ``n`` chunks ending by abort (0: none)."""
        if not self.ctx.abort_enabled or self.collector.stop_after is None:
            return 0
        return self.job.plan.abort_split(n, self.ctx.n_ubatch)

    def decode_group(
        self, g0: int, n: int, bos: int | None, verify: bool
    ) -> list[list[np.ndarray]]:
        """Decode chunks ``[g0, g0 + n)`` side by side into the collector; returns the
        negative log-likelihoods of each chunk's scored tokens (none without perplexity)."""
        plan = self.job.plan
        self._cc_prev = self.collector.acc.chunk_count(plan.n_ctx)
        self.ctx.clear()
        self.collector.acc.chunk = g0 - plan.first
        nll: list[list[np.ndarray]] = [[] for _ in range(n)]
        per = self._per_decode(n)
        self.collector.on_stop = self.ctx.abort_decode if per else None
        for spec in plan.batches(g0, n, bos):
            if not per:
                spec = plan.interleave(spec, self.ctx.n_ubatch)
            for part in plan.split(spec, per) if per else [spec]:
                self.batch.set(part.tokens, part.positions, part.seq_ids, True)
                self.collector.reset_cache()
                self._decode(verify)
                verify = False
            tp = time.perf_counter()
            self._score(g0, spec, nll)
            self.stats.ppl_seconds += time.perf_counter() - tp
        return nll

    def _decode(self, verify: bool) -> None:
        if not verify:
            self.ctx.decode(self.batch)
            return
        self.collector.start_verify()  # the first decode after the probe
        self.ctx.decode(self.batch)
        if not self.collector.finish_verify(self.batch.n_tokens):
            self.ctx.clear()  # the group's first decode: nothing of this group is kept
            self.collector.reset_cache()
            self.ctx.decode(self.batch)

    def _score(self, g0: int, spec: BatchSpec, nll: list[list[np.ndarray]]) -> None:
        """Negative log-likelihoods of this batch's tokens in each chunk's second half
        (``spec``: the batch as decoded, whose row order the logits follow)."""
        if self.ppl is None:
            return
        n_ctx, b0, bs = self.job.plan.n_ctx, spec.start, spec.size
        lo, hi = max(n_ctx // 2, b0), min(n_ctx - 1, b0 + bs)
        if hi <= lo:
            return
        lg = self.ctx.logits(self.batch.n_tokens)
        toks = self.job.plan.tokens
        for s in range(spec.n_seq):
            c0 = (g0 + s) * n_ctx + b0
            for row, j, count in spec.runs(s, lo - b0, hi - b0):
                targets = toks[c0 + j + 1 : c0 + j + count + 1]
                nll[s].append(token_nll(lg[row : row + count], targets, self.pool, self.n_threads))

    def after_group(
        self, g0: int, n: int, nll: list[list[np.ndarray]], on_chunk: ChunkCallback | None
    ) -> bool:
        """Add the group's perplexity and count it, then write what is due: a
        convergence record, a checkpoint, a snapshot; stop here if asked to (SIGTERM).
        True when the collection has converged here (the output follows at once)."""
        for s in range(n):
            running = None if self.ppl is None else self.ppl.add_chunk(np.concatenate(nll[s]))
            if on_chunk is not None:
                on_chunk(g0 + s, running)
        n_ctx = self.job.plan.n_ctx
        self.stats.n_tokens += n * n_ctx
        faults.point("collect.chunk")
        if self._bar is not None:
            self._bar.update(n * n_ctx)
        plan, reached = self.job.plan, g0 + n
        conv = self.stats.convergence
        converged = conv is not None and conv.after_group(g0, reached, self.collector.acc.entries)
        if converged:
            self.stats.end_chunk = reached
        if self.job.output is None:
            return converged
        freq = self.job.settings.output_frequency
        last = reached if converged else plan.last  # as if --chunks had ended it here
        due = checkpoint_due(g0, reached, first=plan.first, last=last, frequency=freq)
        if due:
            self.write_checkpoint(reached)
        self.save_snapshot_if_due()
        if self.stop.requested and reached < last:
            if not due:  # off the cadence: the sums are not rounded here, save them exactly
                self.write_checkpoint(reached, exact=True)
            log.warning(
                "terminated by SIGTERM after chunk %d; checkpoint in %s; rerun with "
                "--resume to continue",
                reached,
                self.job.checkpoint,
            )
            raise Terminated(reached, self.job.checkpoint)
        return converged

    def write_checkpoint(self, reached: int, *, exact: bool = False) -> None:
        """A periodic checkpoint rounds the running sums to the file's float32 (the
        uninterrupted run does the same at that chunk); an exact one carries them."""
        ckpt, conv = self.job.checkpoint, self.stats.convergence
        assert ckpt is not None and conv is not None
        write_checkpoint(
            ckpt,
            self.job.data(self.collector.entries(), reached, conv.log.to_json()),
            self.job.signature,
            self.collector.acc.exact_counts(),
            self.ppl,
            self.job.settings.verbosity,
            exact_sums(self.collector.acc.entries) if exact else None,
            conv.state(reached),
        )
        if not exact:
            self.collector.round_to_float32()
        faults.point("collect.checkpointed")

    def save_snapshot_if_due(self) -> None:
        """llama-imatrix's ``--save-frequency``: ``<output>.at_<n>`` when the chunk
        count (largest count in whole chunks) passes a multiple of it."""
        s = self.job.settings
        if s.save_frequency <= 0:
            return
        cc_now = self.collector.acc.chunk_count(self.job.plan.n_ctx)
        if cc_now // s.save_frequency <= self._cc_prev // s.save_frequency:
            return
        snap = Path(f"{self.job.output}.at_{cc_now}")
        conv = self.stats.convergence
        data = self.job.data(
            self.collector.entries(), None, None if conv is None else conv.log.to_json()
        )
        write_imatrix(data, snap, output_format=s.output_format, compat=s.compat)
        self.stats.outputs.append(snap)


@contextlib.contextmanager
def _shutdown(pool: ThreadPoolExecutor | None) -> Iterator[ThreadPoolExecutor | None]:
    try:
        yield pool
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


def _fmt_eta(seconds: float) -> str:
    s = int(seconds)
    h, rem = divmod(s, 3600)
    return (f"{h} hours " if h else "") + f"{rem / 60:.2f} minutes"


def _progress(total: int, enabled: bool | None) -> Any:
    if enabled is False:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="tok",
        unit_scale=True,
        disable=None if enabled is None else False,
        desc="collect",
        leave=False,
    )


__all__ = ["ChunkLoop", "LoopStats", "ThreadPlan", "run_chunks", "thread_plan"]
