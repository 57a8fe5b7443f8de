"""float64 accumulators of the collector: per weight, sums of squares, sums and counts.

One :class:`imatrix.model.Entry` per weight, in llama-imatrix's ``Stats`` layout (a
flat ``values`` vector, one count per expert). A dense ``MUL_MAT`` adds the column
sums of its input to its matrix (a 3-d/4-d weight has one matrix per broadcast slice);
a ``MUL_MAT_ID`` adds each token's row to the experts it was routed to and counts
tokens per expert. How the column sums are formed: :mod:`imatrix.activations`; inputs
that live in GPU memory are summed there (:mod:`imatrix.collect.device`). Without
plain sums (``summer.with_sums`` false: the output cannot store them) the entries
carry none.
"""

from __future__ import annotations

import logging

import numpy as np

from imatrix import ggml
from imatrix.activations import ColumnSums
from imatrix.collect.device import DeviceSums
from imatrix.collect.shared_inputs import (
    DenseParts,
    MoeParts,
    SharedInputs,
    host_span,
    moe_key,
    tensor_key,
)
from imatrix.errors import ImatrixError
from imatrix.model import Entry

log = logging.getLogger(__package__)  # one logger name for the whole collector


def _check_finite(sq: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(sq)):
        raise ImatrixError(f"non-finite activations (NaN or Inf) in the input of '{name}'")


class Accumulators:
    """The sums so far, and the arithmetic that adds an observed node's input to them.

    ``trace`` logs every node as llama-imatrix's ``-lv 2`` does, numbered with
    :attr:`chunk`; ``device`` sums inputs that live on a GPU there (None: as
    ``IMATRIX_DEVICE_SUMS`` says, see :mod:`imatrix.collect.device`)."""

    def __init__(
        self,
        entries: dict[str, Entry] | None,
        summer: ColumnSums,
        shared: SharedInputs,
        trace: bool = False,
        device: DeviceSums | None = None,
    ) -> None:
        self.entries: dict[str, Entry] = {n: e.copy() for n, e in (entries or {}).items()}
        if not summer.with_sums:
            for e in self.entries.values():
                e.sums = None
        self.summer = summer
        self.shared = shared
        self.trace = trace
        self.device = DeviceSums() if device is None else device
        self.chunk = 0
        self._scratch: dict[int, np.ndarray] = {}

    # -- state ------------------------------------------------------------------

    def snapshot(self) -> dict[str, Entry]:
        return {n: e.copy() for n, e in self.entries.items()}

    def restore(self, snapshot: dict[str, Entry]) -> None:
        self.entries = snapshot

    def sorted_entries(self) -> dict[str, Entry]:
        """Copies of the entries, sorted by name."""
        return {n: e.copy() for n, e in sorted(self.entries.items())}

    def exact_counts(self) -> dict[str, list[int]]:
        return {n: [int(c) for c in e.counts] for n, e in self.entries.items()}

    def chunk_count(self, n_ctx: int) -> int:
        """llama-imatrix's ``m_last_chunk``: the largest count in whole chunks."""
        counts = (float(e.counts.max()) for e in self.entries.values() if e.counts.size)
        return int(max(counts, default=0.0)) // n_ctx

    def round_to_float32(self) -> None:
        """Round the sums to the float32 a file stores (so that a run resumed from a
        checkpoint continues from exactly the state the uninterrupted run has)."""
        for e in self.entries.values():
            e.values = e.values.astype(np.float32).astype(np.float64)
            if e.sums is not None:
                e.sums = e.sums.astype(np.float32).astype(np.float64)

    # -- dense ------------------------------------------------------------------

    def dense(self, name: str, src0: ggml.GGMLTensor, src1: ggml.GGMLTensor) -> int:
        """Add a ``MUL_MAT``'s input; returns the rows added per matrix."""
        ne0 = int(src1.ne[0])
        ne02, ne03 = int(src0.ne[2]), int(src0.ne[3])
        n_mat = ne02 * ne03
        acc = self._dense_entry(name, ne0 * n_mat)
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
        for mat, (sq, sm) in self._dense_parts(name, src1, ne02, ne03).items():
            vals[mat] += sq
            if sums is not None and sm is not None:
                sums[mat] += sm
        inc = int(src1.ne[1] * src1.ne[2] * src1.ne[3]) // n_mat
        acc.counts += inc
        return inc

    def _dense_entry(self, name: str, size: int) -> Entry:
        acc = self.entries.get(name)
        if acc is None:
            acc = Entry(np.zeros(size), np.zeros(1), self._new_sums(size))
            self.entries[name] = acc
            return acc
        # one count per dense tensor (older 3-d files store equal counts per matrix)
        if acc.counts.size > 1 and np.all(acc.counts == acc.counts[0]):
            acc.counts = acc.counts[:1].copy()
        if acc.values.size != size:
            raise ImatrixError(
                f"inconsistent size for '{name}': {acc.values.size} values, the model gives {size}"
            )
        return acc

    def _new_sums(self, size: int) -> np.ndarray | None:
        return np.zeros(size) if self.summer.with_sums else None

    def _dense_parts(self, name: str, src1: ggml.GGMLTensor, ne02: int, ne03: int) -> DenseParts:
        """(sum of squares, sum) per matrix; a 2-d input into a 2-d weight may be shared."""
        ne12, ne13 = int(src1.ne[2]), int(src1.ne[3])
        single = (ne12, ne13, ne02 * ne03) == (1, 1, 1)
        key = tensor_key(src1)
        hit = self.shared.get(key) if single else None
        if isinstance(hit, dict):
            return hit
        if (on_device := self.device.dense(name, src1, ne02, ne03)) is not None:
            for sq, _ in on_device.values():
                _check_finite(sq, name)
            return on_device
        x = ggml.host_array(src1, np.dtype(np.float32), self._scratch)
        parts: DenseParts = {}
        for i3 in range(ne13):
            for i2 in range(ne12):
                sq, sm = self.summer.dense(x[i3, i2])
                _check_finite(sq, name)
                mat = (i3 % ne03) * ne02 + (i2 % ne02)
                if mat in parts:
                    sq0, sm0 = parts[mat]
                    parts[mat] = (sq0 + sq, None if sm0 is None or sm is None else sm0 + sm)
                else:
                    parts[mat] = (sq, sm)
        if single and (span := host_span(src1)) is not None:
            self.shared.put(key, [span], parts)
        return parts

    # -- experts ------------------------------------------------------------------

    def moe(
        self, name: str, src0: ggml.GGMLTensor, src1: ggml.GGMLTensor, ids_t: ggml.GGMLTensor
    ) -> int:
        """Add a ``MUL_MAT_ID``'s input to the experts each token was routed to;
        returns the tokens seen."""
        ne0, n_tokens, n_as = int(src1.ne[0]), int(src1.ne[2]), int(src0.ne[2])
        if int(ids_t.ne[1]) != n_tokens:
            raise ImatrixError(f"tensor '{name}': expert ids do not match the tokens")
        if int(src1.ne[3]) != 1:
            raise ImatrixError(f"tensor has more than 3 dimensions: {name}")
        acc = self._moe_entry(name, ne0, n_as)
        if self.trace:
            log.info(
                "collect_imatrix[%d]: %32s, MUL_MAT_ID, %5d x %5d", self.chunk, name, ne0, n_tokens
            )
        touched, sq, sm, counts = self._moe_parts(name, src0, src1, ids_t)
        acc.values.reshape(n_as, ne0)[touched] += sq
        if acc.sums is not None and sm is not None:
            acc.sums.reshape(n_as, ne0)[touched] += sm
        acc.counts += counts
        return n_tokens

    def _moe_entry(self, name: str, ne0: int, n_as: int) -> Entry:
        acc = self.entries.get(name)
        if acc is not None and acc.counts.size == 1 and n_as > 1:
            acc.counts = np.full(n_as, acc.counts[0])  # broadcast an old single count
        if acc is None:
            acc = Entry(np.zeros(ne0 * n_as), np.zeros(n_as), self._new_sums(ne0 * n_as))
            self.entries[name] = acc
        elif acc.values.size != ne0 * n_as:
            raise ImatrixError(
                f"inconsistent size for '{name}': {acc.values.size} values, the model gives {ne0 * n_as}"
            )
        elif acc.counts.size != n_as:
            raise ImatrixError(
                f"inconsistent expert count for '{name}': {acc.counts.size}, the model has {n_as}"
            )
        return acc

    def _moe_parts(
        self, name: str, src0: ggml.GGMLTensor, src1: ggml.GGMLTensor, ids_t: ggml.GGMLTensor
    ) -> MoeParts:
        key = moe_key(src0, src1, ids_t)
        n_as = int(src0.ne[2])
        hit = self.shared.get(key)
        if isinstance(hit, tuple):
            return hit
        if (on_device := self.device.moe(name, src1, ids_t, n_as)) is not None:
            _check_finite(on_device[1], name)
            return on_device
        ne0, ne11, n_tokens = int(src1.ne[0]), int(src1.ne[1]), int(src1.ne[2])
        ids = ggml.host_array(ids_t, np.dtype(np.int32), self._scratch)[0, 0]  # [tokens, ids]
        n_ids = int(ids_t.ne[0])
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
        sq, sm = self.summer.grouped(x[0].reshape(n_tokens * ne11, ne0), src_rows[order], starts)
        _check_finite(sq, name)
        parts: MoeParts = (touched, sq, sm, np.bincount(flat, minlength=n_as))
        s1, s2 = host_span(src1), host_span(ids_t)
        if s1 is not None and s2 is not None:
            self.shared.put(key, [s1, s2], parts)
        return parts


__all__ = ["Accumulators"]
