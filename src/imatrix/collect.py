"""The collector: importance matrices through llama.cpp's eval callback, as llama-imatrix.

How: llama.cpp's graph scheduler calls ``cb_eval(tensor, ask)`` for every node it is
about to compute. We answer ``ask`` exactly as llama-imatrix's ``collect_imatrix``
does (every ``MUL_MAT_ID``; a ``MUL_MAT`` when its F32 input has at least 16 rows and
its weight is a ``blk.*`` tensor, or ``output.weight`` with ``process_output``), and
when the node has been computed we read its input activations (``src[1]``, copied to
host when it lives on a device) and the expert ids (``src[2]``) through
:mod:`imatrix.ggml`, and add squares, plain sums and per-expert counts into float64
accumulators with numpy (:mod:`imatrix.activations` says how the sums are formed).

Chunking, BOS, sequences per batch, ``--chunk``/``--chunks`` and perplexity follow
``compute_imatrix`` in tools/imatrix/imatrix.cpp; chunk counts in files follow
llama.cpp (``max count // chunk size``).

Speed: llama-imatrix asks for the logits of every token (fewer outputs would make
llama.cpp drop rows before the last layer's FFN and change its statistics), so on a
large vocabulary the output projection costs more than the rest of the model. When
nothing needs logits (no perplexity, no ``output.weight``), we return ``false`` from
the callback right after the last tensor the imatrix needs: the scheduler stops the
current graph split there and the output projection is never computed. Which tensor
is last is found by a probe decode of a few dozen tokens whose sums are discarded,
and confirmed on the first real decode: every probed tensor must have covered every
token, or that decode is undone and run again in full, for good (see
:class:`Collector`). Stopping is safe for the KV cache: a layer writes it in its
attention, before its FFN. Later graph splits (with ``-ngl`` offloading) still run;
they compute only what comes after the last needed tensor, so the data are the same
either way, and tests check both paths against llama-imatrix.

Other costs kept small: inputs shared by consecutive matrices (q/k/v, gate/up) are
summed once (:meth:`Collector._cache_get`), sums run in cache-sized blocks
(:mod:`imatrix.activations`), and perplexity is computed on the logits in bulk, split
across threads (:mod:`imatrix.perplexity`).

Resume: every ``output_frequency`` chunks the data so far go to
``<output>.checkpoint`` (our GGUF layout plus the chunk reached and, in one
``imatrix_pipeline.checkpoint`` key, exact counts and the perplexity state). The
float64 sums are rounded to the file's float32 at each checkpoint, in the running
process too, so that a resumed run writes exactly the bytes an uninterrupted one
would. The output is written once, atomically, at the end; then the checkpoint goes.
A checkpoint carries a sha256 of everything a resume takes from it: a truncated or
damaged one is ignored with a warning (the run starts over), never trusted. While it
runs, a collection holds ``<output>.lock`` (:mod:`imatrix.writelock`): a second
collector of the same output (a rerun while an orphaned job still runs) waits for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imatrix import faults, ggml
from imatrix.activations import ColumnSums
from imatrix.constants import PROVENANCE_PREFIX
from imatrix.errors import ImatrixError
from imatrix.formats import (
    FORMAT_DAT,
    FORMAT_GGUF,
    FORMATS,
    atomic_write,
    check_writable,
    read_imatrix,
    remove_stale_temporaries,
    to_gguf_bytes,
    write_imatrix,
)
from imatrix.gguf_io import read_gguf
from imatrix.llama_api import Batch, Context, default_threads, gpu_offload_supported, load_model
from imatrix.model import Entry, ImatrixData, Provenance
from imatrix.perplexity import Perplexity, token_nll
from imatrix.writelock import exclusive_writer

log = logging.getLogger(__name__)

KEY_CHECKPOINT_STATE = PROVENANCE_PREFIX + "checkpoint"
CHECKPOINT_SUFFIX = ".checkpoint"

#: llama-imatrix ignores MUL_MAT nodes whose input has fewer rows than this
MIN_ROWS = 16


# ---------------------------------------------------------------------------
# accumulation


@dataclass
class _Acc:
    """float64 accumulators of one weight (flat, llama-imatrix's ``Stats`` layout)."""

    values: np.ndarray
    sums: np.ndarray | None
    counts: np.ndarray

    @classmethod
    def from_entry(cls, e: Entry) -> _Acc:
        return cls(
            e.values.astype(np.float64).copy(),
            None if e.sums is None else e.sums.astype(np.float64).copy(),
            e.counts.astype(np.float64).copy(),
        )

    def entry(self) -> Entry:
        return Entry(
            self.values.copy(), self.counts.copy(), None if self.sums is None else self.sums.copy()
        )


class Collector:
    """The eval callback and its accumulators.

    ``stop_after``: None (never stop a graph early), or a tensor name after whose
    observation the callback returns false. It is found by a probe and confirmed on
    the first real decode:

    - :meth:`start_probe` / :meth:`finish_probe` around a small decode (a few dozen
      tokens, at least 16 so that every MUL_MAT is needed; nothing is accumulated)
      record the needed tensors in graph order. Stopping is armed after the last one
      when each occurred once and no MUL_MAT was skipped for too few rows.
    - :meth:`start_verify` / :meth:`finish_verify` around the first real decode
      require every probed tensor to have covered every token of that decode; if one
      did not (the real graphs differ from the probe's), the accumulators are put
      back as they were, stopping is disarmed for good, and the caller decodes the
      batch again in full.
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
    ) -> None:
        layout = ggml.check_layout()
        self._op_mm = layout.op_mul_mat
        self._op_mmid = layout.op_mul_mat_id
        self.process_output = process_output
        self.trace = trace
        self.acc: dict[str, _Acc] = {n: _Acc.from_entry(e) for n, e in (entries or {}).items()}
        self.stop_after: str | None = None
        self.probing = False
        self.verifying = False
        self._seq: list[str] = []
        self._rows: dict[str, int] = {}
        self._small = False
        self._snapshot: dict[str, _Acc] | None = None
        self._scratch: dict[int, np.ndarray] = {}
        self.chunk = 0  # for trace messages
        self.n_observed = 0
        self.n_reused = 0
        #: time spent reading and summing activations (inside llama_decode)
        self.seconds = 0.0
        self.summer = ColumnSums(threads, pool)
        #: reuse column sums of an input shared by consecutive nodes (CPU backend only)
        self.reuse_inputs = reuse_inputs
        self._cache: tuple[tuple, list[tuple[int, int]], object] | None = None

    def close(self) -> None:
        self.summer.close()

    def reset_cache(self) -> None:
        self._cache = None

    # -- callback ---------------------------------------------------------------

    def __call__(self, addr: int, ask: bool) -> bool:
        t = ggml.tensor(addr)
        if ask:
            return self._ask(t)
        t0 = time.perf_counter()
        name = self._observe(t)
        self.seconds += time.perf_counter() - t0
        return name != self.stop_after

    def _ask(self, t: ggml.GGMLTensor) -> bool:
        if self._cache is not None and t.data:
            self._invalidate_if_written(t)
        op = t.op
        if op == self._op_mmid:
            return True
        if op != self._op_mm:
            return False
        src1 = ggml.tensor(t.src[1])
        if src1.type != ggml.GGML_TYPE_F32:
            return False
        if src1.ne[1] < MIN_ROWS:
            if self.probing and self._wanted(ggml.filter_name(ggml.tensor(t.src[0]).name)):
                self._small = True
            return False
        return self._wanted(ggml.filter_name(ggml.tensor(t.src[0]).name))

    def _wanted(self, name: str) -> bool:
        return name.startswith("blk.") or (self.process_output and name == "output.weight")

    # -- shared inputs ------------------------------------------------------------------
    #
    # q/k/v (and gate/up, and the experts' gate/up) multiply the same input tensor one
    # after the other. Its column sums are computed once and reused while the memory
    # they were read from provably holds the same data: every node is asked about
    # before it is computed, so a node whose output overlaps that memory drops the
    # cache first. Only on the CPU backend (a single split, no scheduler copies that
    # are written without being asked about) and for host memory.

    def _invalidate_if_written(self, t: ggml.GGMLTensor) -> None:
        lo = int(t.data)
        hi = lo + int(ggml.libggml_base().ggml_nbytes(ggml.ctypes.addressof(t)))
        assert self._cache is not None
        if any(lo < b and a < hi for a, b in self._cache[1]):
            self._cache = None

    def _cache_get(self, key: tuple) -> object | None:
        c = self._cache
        if c is not None and c[0] == key:
            self.n_reused += 1
            return c[2]
        return None

    def _cache_put(self, key: tuple, ranges: list[tuple[int, int]], value: object) -> None:
        if self.reuse_inputs:
            self._cache = (key, ranges, value)

    @staticmethod
    def _key(t: ggml.GGMLTensor) -> tuple:
        return (ggml.ctypes.addressof(t), t.data, tuple(t.ne), tuple(t.nb))

    def _host_range(self, t: ggml.GGMLTensor) -> tuple[int, int] | None:
        lib = ggml.libggml_base()
        if not t.data or (t.buffer and not lib.ggml_backend_buffer_is_host(t.buffer)):
            return None
        lo = int(t.data)
        return lo, lo + int(lib.ggml_nbytes(ggml.ctypes.addressof(t)))

    # -- observation --------------------------------------------------------------------

    def _observe(self, t: ggml.GGMLTensor) -> str:
        src0 = ggml.tensor(t.src[0])
        src1 = ggml.tensor(t.src[1])
        name = ggml.filter_name(src0.name)
        if src1.nb[0] != 4:
            raise ImatrixError(f"tensor '{name}': activations are not contiguous float32 rows")
        if self.probing:  # record the graph's needed tensors, accumulate nothing
            if t.op == self._op_mmid:
                rows = int(src1.ne[2])
            else:
                rows = int(src1.ne[1] * src1.ne[2] * src1.ne[3]) // int(src0.ne[2] * src0.ne[3])
            self._seq.append(name)
            self._rows[name] = self._rows.get(name, 0) + rows
            return name
        if t.op == self._op_mmid:
            rows = self._observe_moe(name, src0, src1, ggml.tensor(t.src[2]))
        else:
            rows = self._observe_dense(name, src0, src1)
        self.n_observed += 1
        if self.verifying:
            self._rows[name] = self._rows.get(name, 0) + rows
        return name

    def _observe_dense(self, name: str, src0, src1) -> int:
        ne0 = int(src1.ne[0])
        ne02, ne03 = int(src0.ne[2]), int(src0.ne[3])
        n_mat = ne02 * ne03
        acc = self.acc.get(name)
        if acc is None:
            acc = _Acc(np.zeros(ne0 * n_mat), np.zeros(ne0 * n_mat), np.zeros(1))
            self.acc[name] = acc
        else:
            # one count per dense tensor (older 3-d files store equal counts per matrix)
            if acc.counts.size > 1 and np.all(acc.counts == acc.counts[0]):
                acc.counts = acc.counts[:1].copy()
            if acc.values.size != ne0 * n_mat:
                raise ImatrixError(
                    f"inconsistent size for '{name}': {acc.values.size} values, "
                    f"the model gives {ne0 * n_mat}"
                )
        if self.trace:
            log.info(
                "collect_imatrix[%d]: %32s, MUL_MAT, %5d x %5d x %5d",
                self.chunk,
                name,
                ne0,
                int(src1.ne[1]),
                int(src1.ne[2]),
            )
        vals = acc.values.reshape(n_mat, ne0)
        sums = None if acc.sums is None else acc.sums.reshape(n_mat, ne0)
        ne12, ne13 = int(src1.ne[2]), int(src1.ne[3])
        key = self._key(src1)
        hit = self._cache_get(key) if (ne12, ne13, n_mat) == (1, 1, 1) else None
        if hit is not None:
            parts = hit
        else:
            x = ggml.host_array(src1, np.dtype(np.float32), self._scratch)
            parts = {}
            for i3 in range(ne13):
                for i2 in range(ne12):
                    sq, sm = self.summer.dense(x[i3, i2])
                    if not np.all(np.isfinite(sq)):
                        raise ImatrixError(
                            f"non-finite activations (NaN or Inf) in the input of '{name}'"
                        )
                    mat = (i3 % ne03) * ne02 + (i2 % ne02)
                    if mat in parts:
                        parts[mat] = (parts[mat][0] + sq, parts[mat][1] + sm)
                    else:
                        parts[mat] = (sq, sm)
            if (ne12, ne13, n_mat) == (1, 1, 1) and (rng := self._host_range(src1)) is not None:
                self._cache_put(key, [rng], parts)
        for mat, (sq, sm) in parts.items():
            vals[mat] += sq
            if sums is not None:
                sums[mat] += sm
        inc = int(src1.ne[1] * ne12 * ne13) // n_mat
        acc.counts += inc
        return inc

    def _observe_moe(self, name: str, src0, src1, ids_t) -> int:
        ne0 = int(src1.ne[0])
        ne11 = int(src1.ne[1])
        n_tokens = int(src1.ne[2])
        n_as = int(src0.ne[2])
        n_ids = int(ids_t.ne[0])
        if int(ids_t.ne[1]) != n_tokens:
            raise ImatrixError(f"tensor '{name}': expert ids do not match the tokens")
        if int(src1.ne[3]) != 1:
            raise ImatrixError(f"tensor has more than 3 dimensions: {name}")
        acc = self.acc.get(name)
        if acc is not None and acc.counts.size == 1 and n_as > 1:
            acc.counts = np.full(n_as, acc.counts[0])  # broadcast an old single count
        if acc is None:
            acc = _Acc(np.zeros(ne0 * n_as), np.zeros(ne0 * n_as), np.zeros(n_as))
            self.acc[name] = acc
        elif acc.values.size != ne0 * n_as:
            raise ImatrixError(
                f"inconsistent size for '{name}': {acc.values.size} values, the model gives {ne0 * n_as}"
            )
        elif acc.counts.size != n_as:
            raise ImatrixError(
                f"inconsistent expert count for '{name}': {acc.counts.size}, the model has {n_as}"
            )
        if self.trace:
            log.info(
                "collect_imatrix[%d]: %32s, MUL_MAT_ID, %5d x %5d", self.chunk, name, ne0, n_tokens
            )
        key = (*self._key(src1), *self._key(ids_t), n_as)
        hit = self._cache_get(key)
        if hit is not None:
            touched, sq, sm, counts = hit
        else:
            ids = ggml.host_array(ids_t, np.dtype(np.int32), self._scratch)[
                0, 0
            ]  # [n_tokens, n_ids]
            flat = np.ascontiguousarray(ids).reshape(-1)
            if flat.size and (flat.min() < 0 or flat.max() >= n_as):
                raise ImatrixError(f"tensor '{name}': expert id out of range 0..{n_as - 1}")
            x = ggml.host_array(src1, np.dtype(np.float32), self._scratch)
            # row of src1 for (token, slot): broadcast inputs (ne11 == 1) reuse the token's row
            src_rows = (
                np.arange(n_tokens)[:, None] * ne11 + (np.arange(n_ids) % ne11)[None, :]
            ).reshape(-1)
            order = np.argsort(flat, kind="stable")
            experts_sorted = flat[order]
            starts = np.flatnonzero(np.r_[True, experts_sorted[1:] != experts_sorted[:-1]])
            touched = experts_sorted[starts]
            sq, sm = self.summer.grouped(
                x[0].reshape(n_tokens * ne11, ne0), src_rows[order], starts
            )
            if not np.all(np.isfinite(sq)):
                raise ImatrixError(f"non-finite activations (NaN or Inf) in the input of '{name}'")
            counts = np.bincount(flat, minlength=n_as)
            r1, r2 = self._host_range(src1), self._host_range(ids_t)
            if r1 is not None and r2 is not None:
                self._cache_put(key, [r1, r2], (touched, sq, sm, counts))
        acc.values.reshape(n_as, ne0)[touched] += sq
        if acc.sums is not None:
            acc.sums.reshape(n_as, ne0)[touched] += sm
        acc.counts += counts
        return n_tokens

    # -- early stop -------------------------------------------------------------------

    def start_probe(self) -> None:
        self.probing = True
        self._seq = []
        self._rows = {}
        self._small = False

    def finish_probe(self, n_tokens: int) -> bool:
        """Arm stopping after the probe's last needed tensor if the probe shows it is safe."""
        self.probing = False
        seq, rows = self._seq, self._rows
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
        self.verifying = True
        self._rows = {}
        self._snapshot = {
            n: _Acc(a.values.copy(), None if a.sums is None else a.sums.copy(), a.counts.copy())
            for n, a in self.acc.items()
        }

    def finish_verify(self, n_tokens: int) -> bool:
        """True when the decode covered every probed tensor fully; else undo it and disarm."""
        self.verifying = False
        probed = set(self._seq)
        ok = all(self._rows.get(n, 0) == n_tokens for n in probed)
        if not ok:
            assert self._snapshot is not None
            self.acc = self._snapshot
            self.stop_after = None
            log.debug(
                "graphs differ from the probe (%s); running them in full",
                {
                    n: self._rows.get(n, 0)
                    for n in sorted(probed)
                    if self._rows.get(n, 0) != n_tokens
                },
            )
        self._snapshot = None
        return ok

    # -- results ----------------------------------------------------------------------

    def entries(self) -> dict[str, Entry]:
        return {n: a.entry() for n, a in sorted(self.acc.items())}

    def round_to_float32(self) -> None:
        """Round the sums to the float32 a file stores (see the module docstring)."""
        for a in self.acc.values():
            a.values = a.values.astype(np.float32).astype(np.float64)
            if a.sums is not None:
                a.sums = a.sums.astype(np.float32).astype(np.float64)


# ---------------------------------------------------------------------------
# public API


@dataclass
class CollectResult:
    """What :func:`collect` returns."""

    data: ImatrixData
    perplexity: Perplexity | None
    #: absolute chunk range processed, [first, last)
    first_chunk: int
    last_chunk: int
    n_tokens: int
    #: whole call (model load included) and the chunk loop alone
    seconds: float
    compute_seconds: float
    #: True when graphs were cut after the last needed tensor
    stopped_early: bool
    resumed_from: int | None = None
    #: parts of compute_seconds: summing activations (in the callback), perplexity
    collect_seconds: float = 0.0
    ppl_seconds: float = 0.0
    outputs: list[Path] = field(default_factory=list)


def checkpoint_path(output: str | Path) -> Path:
    return Path(str(output) + CHECKPOINT_SUFFIX)


def plan_batches(n_ctx: int, n_batch: int) -> tuple[int, int, int]:
    """``(n_seq, n_kv, n_batch)`` as llama-imatrix derives them from ``-c`` and ``-b``."""
    if n_ctx <= 0:
        raise ImatrixError(f"n_ctx must be positive, got {n_ctx}")
    if n_batch <= 0:
        raise ImatrixError(f"n_batch must be positive, got {n_batch}")
    n_seq = max(1, n_batch // n_ctx)
    n_kv = n_seq * n_ctx
    return n_seq, n_kv, min(n_batch, n_kv)


def _resolve_tokens(
    tokens: str | Path | np.ndarray, dataset: str | None
) -> tuple[np.ndarray, str | None, dict | None]:
    if isinstance(tokens, np.ndarray):
        arr = np.ascontiguousarray(tokens, dtype=np.int32)
        if arr.ndim != 1:
            raise ImatrixError(f"tokens must be a 1-D array, got shape {arr.shape}")
        return arr, dataset, None
    from imatrix.tokenize import load_tokens

    arr, meta = load_tokens(tokens)
    if dataset is None:
        dataset = str(meta["text"]) if meta and meta.get("text") else str(tokens)
    return arr, dataset, meta


def _signature(
    *,
    model_sha: str | None,
    tokens: np.ndarray,
    n_ctx: int,
    first: int,
    last: int,
    dataset: str | None,
    process_output: bool,
    base_datasets: list[str],
) -> dict:
    return {
        "model_sha256": model_sha,
        "tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
        "n_ctx": n_ctx,
        "first_chunk": first,
        "last_chunk": last,
        "dataset": dataset,
        "process_output": process_output,
        "base_datasets": base_datasets,
    }


class CorruptCheckpoint(ImatrixError):
    """A checkpoint that cannot be trusted (truncated, damaged, not a checkpoint): a
    resuming run ignores it with a warning and starts over."""


class StaleCheckpoint(ImatrixError):
    """A sound checkpoint of other settings: the CLI refuses it (the user decides), the
    workflow discards it, since a config change has made the job's old work obsolete."""


def _checkpoint_digest(data: ImatrixData, state: dict) -> str:
    """sha256 over everything a resume takes from a checkpoint: the state (exact
    counts, perplexity, settings), the chunk reached, the datasets, and the float32
    sums and counts exactly as the file stores them. A damaged file that still parses
    fails this check."""
    h = hashlib.sha256()
    meta = {
        "state": state,
        "chunk_reached": data.provenance.chunk_reached,
        "datasets": list(data.datasets),
    }
    h.update(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(data.entries):
        e = data.entries[name]
        h.update(name.encode("utf-8") + b"\0")
        for arr in (e.values, e.counts, e.sums):
            if arr is not None:
                h.update(np.ascontiguousarray(arr, dtype="<f4").tobytes())
    return h.hexdigest()


def _load_checkpoint(path: Path, signature: dict) -> tuple[ImatrixData, int, dict]:
    """Data, chunk reached and state of a checkpoint made with ``signature``.

    Raises :class:`CorruptCheckpoint` for a file that cannot be trusted and
    :class:`ImatrixError` for a sound checkpoint of other settings (resuming from it
    would silently mix two different computations)."""
    try:
        data = read_imatrix(path)
        g = read_gguf(path, load_data=False)
    except ImatrixError as exc:
        raise CorruptCheckpoint(f"ignoring unusable checkpoint {exc}") from exc
    raw = g.get(KEY_CHECKPOINT_STATE)
    if raw is None or data.provenance.chunk_reached is None:
        raise CorruptCheckpoint(
            f"ignoring {path}: not a collector checkpoint (no '{KEY_CHECKPOINT_STATE}' key)"
        )
    try:
        state = json.loads(raw)
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise CorruptCheckpoint(f"ignoring {path}: corrupt checkpoint state ({exc})") from exc
    digest = state.pop("sha256", None)
    if digest != _checkpoint_digest(data, state):
        raise CorruptCheckpoint(
            f"ignoring {path}: "
            + ("no checksum" if digest is None else "checksum mismatch (the file is damaged)")
        )
    theirs = state.get("signature", {})
    diff = sorted(k for k in signature if theirs.get(k) != signature[k])
    if diff:
        raise StaleCheckpoint(
            f"{path}: checkpoint was made with different settings ({', '.join(diff)}); "
            "delete it or run without --resume"
        )
    reached = int(data.provenance.chunk_reached)
    if not signature["first_chunk"] <= reached <= signature["last_chunk"]:
        raise StaleCheckpoint(
            f"{path}: checkpoint chunk {reached} is outside the range being collected"
        )
    for name, counts in state.get("counts", {}).items():
        if name in data.entries:
            data.entries[name].counts = np.asarray(counts, dtype=np.float64)
    return data, reached, state


def collect(
    model: str | Path,
    tokens: str | Path | np.ndarray,
    output: str | Path | None = None,
    *,
    first_chunk: int = 0,
    last_chunk: int | None = None,
    n_ctx: int = 512,
    n_batch: int = 2048,
    n_ubatch: int = 512,
    threads: int | None = None,
    n_gpu_layers: int = -1,
    process_output: bool = False,
    compute_ppl: bool = True,
    output_frequency: int = 10,
    save_frequency: int = 0,
    output_format: str = FORMAT_GGUF,
    compat: bool = False,
    dataset: str | None = None,
    provenance: Provenance | None = None,
    in_data: ImatrixData | None = None,
    resume: bool = False,
    stop_early: bool | None = None,
    reuse_inputs: bool | None = None,
    sum_threads: int | None = None,
    progress: bool | None = None,
    verbosity: int = 1,
    on_chunk: Callable[[int, float | None], None] | None = None,
) -> CollectResult:
    """Collect an importance matrix over chunks ``[first_chunk, last_chunk)`` of ``tokens``.

    ``tokens``: the whole dataset's tokens (a ``.npy`` from
    :func:`imatrix.tokenize.tokenize_file`, or an int32 array); chunk ``k`` is
    ``tokens[k*n_ctx:(k+1)*n_ctx]``, BOS replaces its first token when the model adds
    BOS. ``last_chunk`` None means every whole chunk. ``dataset`` is recorded in
    ``imatrix.datasets`` (default: the text path recorded beside a tokens file, else
    that file's path; nothing for an array). ``in_data``: loaded imatrix data to
    continue from (``--in-file`` with ``-f``). ``provenance``: model/dataset sha256 and
    tokenizer settings to record.

    Writes ``output`` (atomically, once, at the end) in ``output_format`` (``compat``:
    llama-imatrix's GGUF layout only), ``<output>.checkpoint`` every
    ``output_frequency`` chunks (0: never), ``<output>.at_<n>`` snapshots every
    ``save_frequency`` chunks (llama-imatrix's ``--save-frequency``); ``resume``
    continues from an existing checkpoint made with the same settings. ``stop_early``:
    None lets the collector cut graphs after the last needed tensor whenever nothing
    needs logits; False never does (True is the same as None: it is never done when
    logits are needed). ``reuse_inputs``: compute the sums of an input shared by
    consecutive matrices once (None: with a CPU-only llama.cpp build). ``sum_threads``: threads
    summing activations in the callback (None: 1 on the CPU backend, else ``threads``).
    ``on_chunk(k, running_ppl)`` is called after each chunk.
    """
    t0 = time.perf_counter()
    if output_format not in FORMATS:
        raise ImatrixError(f"unknown output format '{output_format}' (use gguf or dat)")
    toks, dataset, tok_meta = _resolve_tokens(tokens, dataset)
    n_seq, n_kv, n_batch_eff = plan_batches(n_ctx, n_batch)
    n_chunk_max = toks.size // n_ctx
    last = n_chunk_max if last_chunk is None else int(last_chunk)
    first = int(first_chunk)
    if not 0 <= first < last <= n_chunk_max:
        raise ImatrixError(
            f"chunk range [{first}, {last}) is not within the {n_chunk_max} chunks of {n_ctx} "
            f"tokens in the data ({toks.size} tokens)"
        )
    prov = provenance or Provenance()
    if tok_meta and not prov.model_sha256:
        prov = Provenance(
            model_sha256=tok_meta.get("model_sha256"),
            dataset_sha256=[tok_meta["text_sha256"]] if tok_meta.get("text_sha256") else [],
            tokenizer=json.dumps(tok_meta.get("tokenizer"), sort_keys=True, separators=(",", ":"))
            if tok_meta.get("tokenizer")
            else None,
        )
    base = in_data
    base_datasets = list(base.datasets) if base is not None else []
    sig = _signature(
        model_sha=prov.model_sha256,
        tokens=toks,
        n_ctx=n_ctx,
        first=first,
        last=last,
        dataset=dataset,
        process_output=process_output,
        base_datasets=base_datasets,
    )
    if output is not None:
        check_writable(output)  # now, not after hours of work
    # one writer per output (a rerun while an orphaned job still runs waits for it)
    with exclusive_writer(output) if output is not None else contextlib.nullcontext():
        ckpt = checkpoint_path(output) if output is not None else None
        if output is not None and ckpt is not None:
            n_stale = remove_stale_temporaries(output) + remove_stale_temporaries(ckpt)
            if n_stale:
                log.info("removed %d temporary file(s) left by an interrupted run", n_stale)
        start = first
        ppl = Perplexity() if compute_ppl else None
        entries: dict[str, Entry] = {n: e.copy() for n, e in base.entries.items()} if base else {}
        resumed_from = None
        loaded = None
        if resume and ckpt is not None and ckpt.is_file():
            try:
                loaded = _load_checkpoint(ckpt, sig)
            except CorruptCheckpoint as exc:
                log.warning("%s; starting from chunk %d", exc, first)
        if loaded is not None:
            cdata, start, state = loaded
            entries = cdata.entries
            resumed_from = start
            if compute_ppl and state.get("ppl") is not None:
                ppl = Perplexity.from_state(state["ppl"])
            elif compute_ppl:
                log.warning(
                    "%s has no perplexity state; perplexity covers only the chunks from %d",
                    ckpt,
                    start,
                )
            log.info("resuming from %s at chunk %d", ckpt, start)
        elif not resume and ckpt is not None and ckpt.is_file():
            log.warning("ignoring existing checkpoint %s (no --resume); it will be replaced", ckpt)

        def make_data(coll: Collector, reached: int | None) -> ImatrixData:
            data = ImatrixData(
                entries=coll.entries(),
                datasets=base_datasets + ([dataset] if dataset else []),
                chunk_size=n_ctx,
                provenance=Provenance(
                    model_sha256=prov.model_sha256,
                    dataset_sha256=list(base.provenance.dataset_sha256 if base else [])
                    + list(prov.dataset_sha256),
                    tokenizer=prov.tokenizer,
                    version=prov.version,
                    chunk_reached=reached,
                ),
            )
            data.chunk_count = data.derived_chunk_count()
            return data

        n_threads = threads if threads and threads > 0 else default_threads()
        # a build that can offload may move work to the GPU even with -ngl 0 (op offload),
        # and then the scheduler writes copies of inputs the callback is never asked about
        cpu_only = not gpu_offload_supported()
        if reuse_inputs is None:
            reuse_inputs = cpu_only
        # helper threads for numpy work while llama.cpp waits: perplexity always; the
        # callback's sums only with a GPU, since on the CPU backend llama.cpp's own
        # (OpenMP) threads spin for a while after each graph piece and would share the
        # cores with ours
        pool = ThreadPoolExecutor(n_threads - 1) if n_threads > 1 else None
        if sum_threads is None:
            sum_threads = 1 if cpu_only else n_threads
        collector = Collector(
            process_output=process_output,
            entries=entries,
            trace=verbosity >= 2,
            threads=sum_threads,
            reuse_inputs=reuse_inputs,
            pool=pool,
        )
        may_stop = stop_early is not False and not compute_ppl and not process_output
        outputs: list[Path] = []
        n_done_tokens = 0
        with (
            _shutdown(pool),
            contextlib.closing(collector),
            load_model(model, n_gpu_layers=n_gpu_layers) as m,
        ):
            if m.add_eos:
                raise ImatrixError(
                    f"{model}: the model adds EOS tokens; llama-imatrix refuses such models"
                )
            add_bos, bos = m.add_bos, m.bos
            with Context(
                m,
                n_ctx=n_kv,
                n_batch=n_batch_eff,
                n_ubatch=n_ubatch,
                n_seq_max=n_seq,
                n_threads=n_threads,
                cb_eval=collector,
            ) as ctx:
                if n_kv > m.n_ctx_train:
                    log.warning(
                        "model was trained on only %d context tokens (%d specified)",
                        m.n_ctx_train,
                        n_kv,
                    )
                batch = Batch(n_batch_eff)
                num_batches = (n_ctx + n_batch_eff - 1) // n_batch_eff
                first_score = n_ctx // 2
                total = last - start
                log.info(
                    "computing over %d chunks (%d to %d), n_ctx=%d, batch_size=%d, n_seq=%d",
                    total,
                    start,
                    last,
                    n_ctx,
                    n_batch_eff,
                    n_seq,
                )
                bar = _progress(total * n_ctx, progress)
                t_loop = time.perf_counter()  # the probe is part of the work
                verify = False
                if may_stop:
                    verify = _probe(
                        ctx,
                        batch,
                        collector,
                        toks[start * n_ctx : (start + 1) * n_ctx],
                        add_bos,
                        bos,
                    )
                ppl_seconds = 0.0
                try:
                    for g0 in range(start, last, n_seq):
                        n_seq_batch = min(n_seq, last - g0)
                        tg = time.perf_counter()
                        cc_prev = _chunk_count(collector, n_ctx)
                        ctx.clear()
                        collector.chunk = g0 - first
                        chunk_nll: list[list[np.ndarray]] = [[] for _ in range(n_seq_batch)]
                        for j in range(num_batches):
                            b0 = j * n_batch_eff
                            bs = min(n_ctx - b0, n_batch_eff)
                            seq_tok = np.stack(
                                [
                                    toks[(g0 + s) * n_ctx + b0 : (g0 + s) * n_ctx + b0 + bs]
                                    for s in range(n_seq_batch)
                                ]
                            )
                            if add_bos and j == 0:
                                seq_tok[:, 0] = bos
                            pos = np.tile(np.arange(b0, b0 + bs, dtype=np.int32), n_seq_batch)
                            seq_ids = np.repeat(np.arange(n_seq_batch, dtype=np.int32), bs)
                            batch.set(seq_tok.reshape(-1), pos, seq_ids, True)
                            collector.reset_cache()
                            if verify:  # the first decode after the probe
                                verify = False
                                collector.start_verify()
                                ctx.decode(batch)
                                if not collector.finish_verify(batch.n_tokens):
                                    ctx.clear()  # j == 0: nothing of this group is kept
                                    collector.reset_cache()
                                    ctx.decode(batch)
                            else:
                                ctx.decode(batch)
                            tp = time.perf_counter()
                            if ppl is not None:
                                lo, hi = max(first_score, b0), min(n_ctx - 1, b0 + bs)
                                if hi > lo:
                                    lg = ctx.logits(batch.n_tokens)
                                    for s in range(n_seq_batch):
                                        rows = lg[s * bs + lo - b0 : s * bs + hi - b0]
                                        c0 = (g0 + s) * n_ctx
                                        chunk_nll[s].append(
                                            token_nll(
                                                rows,
                                                toks[c0 + lo + 1 : c0 + hi + 1],
                                                pool,
                                                n_threads,
                                            )
                                        )
                            ppl_seconds += time.perf_counter() - tp
                        if g0 == start:
                            dt = time.perf_counter() - tg
                            eta = dt * math.ceil(total / n_seq)
                            log.info("%.2f seconds per pass - ETA %s", dt, _fmt_eta(eta))
                        for s in range(n_seq_batch):
                            running = None
                            if ppl is not None:
                                running = ppl.add_chunk(np.concatenate(chunk_nll[s]))
                            if on_chunk is not None:
                                on_chunk(g0 + s, running)
                        n_done_tokens += n_seq_batch * n_ctx
                        faults.point("collect.chunk")
                        if bar is not None:
                            bar.update(n_seq_batch * n_ctx)
                        reached = g0 + n_seq_batch
                        done_prev, done_now = g0 - first, reached - first
                        if output is not None:
                            if (
                                reached < last
                                and output_frequency > 0
                                and done_now // output_frequency > done_prev // output_frequency
                            ):
                                _write_checkpoint(
                                    ckpt,
                                    make_data(collector, reached),
                                    sig,
                                    collector,
                                    ppl,
                                    verbosity,
                                )
                                collector.round_to_float32()
                                faults.point("collect.checkpointed")
                            if save_frequency > 0:
                                cc_now = _chunk_count(collector, n_ctx)
                                if cc_now // save_frequency > cc_prev // save_frequency:
                                    snap = Path(f"{output}.at_{cc_now}")
                                    write_imatrix(
                                        make_data(collector, None),
                                        snap,
                                        output_format=output_format,
                                        compat=compat,
                                    )
                                    outputs.append(snap)
                finally:
                    if bar is not None:
                        bar.close()
                ctx.synchronize()
                compute_seconds = time.perf_counter() - t_loop
                log.debug(
                    "%d tensors observed, %d of them reused a shared input's sums",
                    collector.n_observed,
                    collector.n_reused,
                )
        data = make_data(collector, None)
        if output is not None:
            write_imatrix(data, output, output_format=output_format, compat=compat)
            outputs.append(Path(output))
            faults.point("collect.done")
            if ckpt is not None:
                ckpt.unlink(missing_ok=True)
        if ppl is not None and ppl.ppl is not None:
            err = ppl.error
            (log.debug if on_chunk is not None else log.info)(
                "final estimate: PPL = %.4f +/- %s", ppl.ppl, "n/a" if err is None else f"{err:.5f}"
            )
        return CollectResult(
            data=data,
            perplexity=ppl,
            first_chunk=first,
            last_chunk=last,
            n_tokens=n_done_tokens,
            seconds=time.perf_counter() - t0,
            compute_seconds=compute_seconds,
            collect_seconds=collector.seconds,
            ppl_seconds=ppl_seconds,
            stopped_early=collector.stop_after is not None,
            resumed_from=resumed_from,
            outputs=outputs,
        )


def _probe(
    ctx: Context, batch: Batch, collector: Collector, chunk: np.ndarray, add_bos: bool, bos: int
) -> bool:
    """Decode a few tokens of ``chunk`` to find the last tensor a graph needs (see
    :class:`Collector`); the context is cleared afterwards. True when stopping is armed."""
    n = min(2 * MIN_ROWS, chunk.size, batch.capacity, ctx.n_ubatch)
    if n < MIN_ROWS:
        return False
    toks = chunk[:n].copy()
    if add_bos:
        toks[0] = bos
    collector.start_probe()
    try:
        ctx.clear()
        ctx.decode_tokens(batch, toks, np.arange(n, dtype=np.int32), 0, True)
    finally:
        armed = collector.finish_probe(n)
        ctx.clear()
    return armed


@contextlib.contextmanager
def _shutdown(pool: ThreadPoolExecutor | None):
    try:
        yield pool
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


def _chunk_count(coll: Collector, n_ctx: int) -> int:
    """llama-imatrix's ``m_last_chunk``: the largest count in whole chunks."""
    mx = max((float(a.counts.max()) for a in coll.acc.values() if a.counts.size), default=0.0)
    return int(mx) // n_ctx


def _write_checkpoint(
    path: Path,
    data: ImatrixData,
    sig: dict,
    coll: Collector,
    ppl: Perplexity | None,
    verbosity: int,
) -> None:
    state = {
        "signature": sig,
        "counts": {n: [int(c) for c in a.counts] for n, a in coll.acc.items()},
        "ppl": None if ppl is None else ppl.state(),
    }
    state["sha256"] = _checkpoint_digest(data, state)
    payload = to_gguf_bytes(
        data, extra={KEY_CHECKPOINT_STATE: json.dumps(state, separators=(",", ":"))}
    )
    atomic_write(path, payload)
    (log.info if verbosity >= 1 else log.debug)(
        "checkpoint: %d chunks in %s", data.provenance.chunk_reached or 0, path
    )


def _fmt_eta(seconds: float) -> str:
    s = int(seconds)
    h, rem = divmod(s, 3600)
    return (f"{h} hours " if h else "") + f"{rem / 60:.2f} minutes"


def _progress(total: int, enabled: bool | None):
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


__all__ = [
    "FORMAT_DAT",
    "FORMAT_GGUF",
    "CollectResult",
    "Collector",
    "checkpoint_path",
    "collect",
    "plan_batches",
]
