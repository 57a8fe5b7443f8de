"""The eval callback: which graph nodes llama-imatrix reads, and where their inputs go.

llama.cpp's graph scheduler calls ``cb_eval(tensor, ask)`` for every node it is about
to compute. We answer ``ask`` exactly as llama-imatrix's ``collect_imatrix`` does
(every ``MUL_MAT_ID``; a ``MUL_MAT`` when its F32 input has at least 16 rows and its
weight is a ``blk.*`` tensor, or ``output.weight`` with ``process_output``), and when
the node has been computed we read its input activations (``src[1]``, copied to host
when it lives on a device) and the expert ids (``src[2]``) through
:mod:`imatrix.ggml` and hand them to the accumulators
(:mod:`imatrix.collect.accumulate`), or, while probing, to the graph cut
(:mod:`imatrix.collect.graph_cut`).

Every node we answer ``ask`` with true ends a piece of the graph: the scheduler stops
its threads, calls us, and starts them again. So a needed node whose input's sums are
already cached (q/k/v and gate/up read one input; see
:mod:`imatrix.collect.shared_inputs`) is accumulated while it is asked about and
answered false: it costs no piece of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import gguf

from imatrix import ggml
from imatrix.activations import ColumnSums
from imatrix.collect.accumulate import Accumulators
from imatrix.collect.graph_cut import GraphCut, Mode
from imatrix.collect.shared_inputs import SharedInputs, moe_key, tensor_key
from imatrix.errors import ImatrixError
from imatrix.model import Entry

#: llama-imatrix ignores MUL_MAT nodes whose input has fewer rows than this
MIN_ROWS = 16
#: weights of the output projection (a model that ties it uses the token embedding)
HEAD_WEIGHTS = frozenset(
    f"{gguf.TENSOR_NAMES[t]}.weight"
    for t in (gguf.MODEL_TENSOR.OUTPUT, gguf.MODEL_TENSOR.TOKEN_EMBD)
)


class Collector:
    """The eval callback (:meth:`__call__`), its accumulators and its graph cut.

    ``reuse_inputs``: sum an input shared by consecutive nodes once (CPU backend only);
    ``threads``/``pool``: threads summing activations (see
    :class:`imatrix.activations.ColumnSums`); ``trace``: log every node (``-lv 2``);
    ``with_sums``: plain sums of the activations too (the output can store them).
    """

    def __init__(
        self,
        *,
        process_output: bool = False,
        entries: dict[str, Entry] | None = None,
        trace: bool = False,
        threads: int = 1,
        reuse_inputs: bool = False,
        pool: ThreadPoolExecutor | None = None,
        with_sums: bool = True,
    ) -> None:
        layout = ggml.check_layout()
        self._op_mm = layout.op_mul_mat
        self._op_mmid = layout.op_mul_mat_id
        self.process_output = process_output
        self.shared = SharedInputs(reuse_inputs)
        summer = ColumnSums(threads, pool, with_sums)
        self.acc = Accumulators(entries, summer, self.shared, trace)
        self.cut = GraphCut()
        self._snapshot: dict[str, Entry] | None = None
        self.n_observed = 0
        #: observed tensors accumulated while asked about (no graph split of their own)
        self.n_unsplit = 0
        #: time spent reading and summing activations (inside llama_decode)
        self.seconds = 0.0
        #: called when the tensor a graph stops after has been read, instead of
        #: stopping the graph piece (None: the piece stops; see the loop's abort)
        self.on_stop: Callable[[], None] | None = None
        #: called while probing when the output projection is asked about, to end the
        #: probe's decode there (None: the probe runs in full)
        self.on_head: Callable[[], None] | None = None

    def close(self) -> None:
        self.acc.summer.close()

    def reset_cache(self) -> None:
        """Forget shared-input sums (before every decode: its memory is rewritten)."""
        self.shared.clear()

    @property
    def stop_after(self) -> str | None:
        return self.cut.stop_after

    @property
    def n_reused(self) -> int:
        return self.shared.n_reused

    # -- callback ---------------------------------------------------------------

    def __call__(self, addr: int, ask: bool) -> bool:
        t = ggml.tensor(addr)
        if ask:
            return self._ask(t)
        t0 = time.perf_counter()
        name = self._observe(t)
        self.seconds += time.perf_counter() - t0
        if name != self.cut.stop_after:
            return True
        if self.on_stop is None:
            return False
        self.on_stop()
        return True

    def _ask(self, t: ggml.GGMLTensor) -> bool:
        if t.data:
            self.shared.invalidate_if_written(t)
        op = t.op
        if op == self._op_mmid:
            need = True
        elif op != self._op_mm:
            return False
        else:
            need = self._dense_needed(t)
        if self.cut.mode is Mode.PROBE:
            self._probe_ask(t, need)
        elif need and self.shared.holding and self._take_shared(t):
            return False
        return need

    def _probe_ask(self, t: ggml.GGMLTensor, need: bool) -> None:
        """End the probe's decode at the output projection. The nodes after it are
        still asked about, so a needed one there disarms the cut
        (:meth:`imatrix.collect.graph_cut.GraphCut.asked_needed`)."""
        if (
            self.on_head is not None
            and t.op == self._op_mm
            and ggml.filter_name(ggml.tensor(t.src[0]).name) in HEAD_WEIGHTS
            and self.cut.saw_head()
        ):
            self.on_head()
        if need:
            self.cut.asked_needed()

    def _dense_needed(self, t: ggml.GGMLTensor) -> bool:
        src1 = ggml.tensor(t.src[1])
        if src1.type != ggml.GGML_TYPE_F32:
            return False
        wanted = self._wanted(ggml.filter_name(ggml.tensor(t.src[0]).name))
        if src1.ne[1] < MIN_ROWS:
            if wanted:
                self.cut.saw_small()
            return False
        return wanted

    def _wanted(self, name: str) -> bool:
        return name.startswith("blk.") or (self.process_output and name == "output.weight")

    def _take_shared(self, t: ggml.GGMLTensor) -> bool:
        """Accumulate a needed node while it is asked about, when its input's sums are
        already cached (q/k/v, gate/up read one input): the node then needs no graph
        split of its own, so the scheduler's threads run on without a hand-off. The
        cached sums are those :meth:`_observe` would reuse after the node ran: every
        node between is asked about first and drops the cache if it writes the input.
        Not while probing (nothing is cached) nor for the node a graph stops after."""
        src0 = ggml.tensor(t.src[0])
        src1 = ggml.tensor(t.src[1])
        name = ggml.filter_name(src0.name)
        if name == self.cut.stop_after or src1.nb[0] != 4:
            return False
        if t.op == self._op_mmid:
            key = moe_key(src0, src1, ggml.tensor(t.src[2]))
        elif src1.ne[2] == src1.ne[3] == src0.ne[2] == src0.ne[3] == 1:
            key = tensor_key(src1)
        else:
            return False
        if not self.shared.holds(key):
            return False
        t0 = time.perf_counter()
        self._count(name, self._accumulate(t, name, src0, src1))
        self.seconds += time.perf_counter() - t0
        self.n_unsplit += 1
        return True

    def _observe(self, t: ggml.GGMLTensor) -> str:
        src0 = ggml.tensor(t.src[0])
        src1 = ggml.tensor(t.src[1])
        name = ggml.filter_name(src0.name)
        if src1.nb[0] != 4:
            raise ImatrixError(f"tensor '{name}': activations are not contiguous float32 rows")
        if self.cut.mode is Mode.PROBE:  # record the graph's needed tensors, accumulate nothing
            self.cut.record(name, self._rows(t, src0, src1))
            return name
        self._count(name, self._accumulate(t, name, src0, src1))
        return name

    def _count(self, name: str, rows: int) -> None:
        self.n_observed += 1
        if self.cut.mode is Mode.VERIFY:
            self.cut.record(name, rows)

    def _rows(self, t: ggml.GGMLTensor, src0: ggml.GGMLTensor, src1: ggml.GGMLTensor) -> int:
        """Tokens a node covers: what the accumulators add to its counts."""
        if t.op == self._op_mmid:
            return int(src1.ne[2])
        return int(src1.ne[1] * src1.ne[2] * src1.ne[3]) // int(src0.ne[2] * src0.ne[3])

    def _accumulate(
        self, t: ggml.GGMLTensor, name: str, src0: ggml.GGMLTensor, src1: ggml.GGMLTensor
    ) -> int:
        """Add the node's input to the sums; returns the tokens it covered. (The
        benchmark's do-nothing callback overrides this to measure scheduling alone.)"""
        if t.op == self._op_mmid:
            return self.acc.moe(name, src0, src1, ggml.tensor(t.src[2]))
        return self.acc.dense(name, src0, src1)

    # -- graph cut ----------------------------------------------------------------

    def start_probe(self) -> None:
        self.cut.start_probe()

    def finish_probe(self, n_tokens: int) -> bool:
        return self.cut.finish_probe(n_tokens)

    def start_verify(self) -> None:
        self._snapshot = self.acc.snapshot()
        self.cut.start_verify()

    def finish_verify(self, n_tokens: int) -> bool:
        """True when the decode covered every probed tensor; else its sums are undone."""
        ok = self.cut.finish_verify(n_tokens)
        if not ok:
            assert self._snapshot is not None
            self.acc.restore(self._snapshot)
        self._snapshot = None
        return ok

    # -- results ----------------------------------------------------------------

    def entries(self) -> dict[str, Entry]:
        return self.acc.sorted_entries()

    def round_to_float32(self) -> None:
        self.acc.round_to_float32()


__all__ = ["HEAD_WEIGHTS", "MIN_ROWS", "Collector"]
