"""The in-memory importance matrix: per-tensor sums, counts and provenance.

Why this shape: it mirrors llama-imatrix's own ``Stats`` (a flat ``values`` vector
and one count per expert, ``len(values) % len(counts) == 0``) so that every file
llama.cpp reads or writes round-trips without reshaping, including its odd cases
(a legacy ``.dat`` MoE entry has one count for all experts). Values are float64 so
that our collector's accumulation does not lose precision; where llama.cpp computes a
file's values (combine, legacy conversion) we compute in float32 exactly as it does,
see :func:`combine` and :mod:`imatrix.formats`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence, Sized
from dataclasses import dataclass, field

import numpy as np

from imatrix.constants import DEFAULT_CHUNK_SIZE
from imatrix.errors import ImatrixError

log = logging.getLogger(__name__)


@dataclass
class Entry:
    """Data collected for one weight matrix (or one stack of experts).

    ``values``: sums of squared activations, flat, ``n_counts * row`` elements.
    ``counts``: tokens seen per expert (one element for dense tensors).
    ``sums``: plain sums of activations (same layout as ``values``), or None when the
    source (llama-imatrix, a legacy file) does not have them.
    """

    values: np.ndarray
    counts: np.ndarray
    sums: np.ndarray | None = None

    def __post_init__(self) -> None:
        with np.errstate(invalid="ignore"):  # NaNs from a corrupt file are reported later
            self.values = np.asarray(self.values, dtype=np.float64).reshape(-1)
            self.counts = np.asarray(self.counts, dtype=np.float64).reshape(-1)
            if self.sums is not None:
                self.sums = np.asarray(self.sums, dtype=np.float64).reshape(-1)

    @property
    def n_counts(self) -> int:
        return int(self.counts.size)

    @property
    def row_size(self) -> int:
        return int(self.values.size // max(self.counts.size, 1))

    def matrix(self) -> np.ndarray:
        """Sums of squares as ``[n_counts, row]`` (experts by input channels)."""
        return self.values.reshape(self.n_counts, self.row_size)

    def check(self, name: str) -> None:
        """Refuse shapes llama.cpp could not have written."""
        if self.counts.size == 0 or self.values.size == 0:
            raise ImatrixError(f"tensor '{name}': no values or no counts")
        if self.values.size % self.counts.size:
            raise ImatrixError(
                f"tensor '{name}': {self.values.size} values do not divide into "
                f"{self.counts.size} counts"
            )
        if self.sums is not None and self.sums.size != self.values.size:
            raise ImatrixError(
                f"tensor '{name}': {self.sums.size} activation sums for {self.values.size} values"
            )

    def copy(self) -> Entry:
        return Entry(
            self.values.copy(),
            self.counts.copy(),
            None if self.sums is None else self.sums.copy(),
        )


@dataclass
class Provenance:
    """Where an imatrix came from; lets a merge refuse shards of another model."""

    model_sha256: str | None = None
    dataset_sha256: list[str] = field(default_factory=list)
    tokenizer: str | None = None  # JSON text: add_bos, parse_special, n_vocab, ...
    version: str | None = None
    chunk_reached: int | None = None  # checkpoints only: absolute chunk index reached
    #: a collection's convergence record, JSON (:class:`imatrix.convergence.ConvergenceLog`)
    convergence: str | None = None
    #: per dataset: JSON of how its chunks were chosen ("" for llama-imatrix's stream)
    dataset_selection: list[str] = field(default_factory=list)


@dataclass
class ImatrixData:
    """A whole importance matrix, as a file holds it."""

    entries: dict[str, Entry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    provenance: Provenance = field(default_factory=Provenance)
    #: True when read from a legacy .dat file (affects how llama-quantize derives means).
    is_legacy: bool = False
    #: False for a GGUF lacking the datasets/chunk keys (llama-quantize refuses those).
    has_metadata: bool = True

    def selections(self) -> list[str]:
        """``provenance.dataset_selection`` with one entry per dataset (files that do
        not record it used the plain stream)."""
        sel = self.provenance.dataset_selection
        return list(sel) if len(sel) == len(self.datasets) else [""] * len(self.datasets)

    @property
    def has_sums(self) -> bool:
        """True when every entry carries plain activation sums (the preferred statistics)."""
        return bool(self.entries) and all(e.sums is not None for e in self.entries.values())

    def max_count(self) -> float:
        return max(
            (float(e.counts.max()) for e in self.entries.values() if e.counts.size), default=0
        )

    def derived_chunk_count(self) -> int:
        """``max(count) / chunk_size`` as llama-imatrix computes ``m_last_chunk`` on load."""
        if self.chunk_size <= 0:
            return 0
        return int(round(self.max_count())) // self.chunk_size

    def n_experts(self) -> int:
        return max((e.n_counts for e in self.entries.values()), default=0)

    def means(self) -> dict[str, np.ndarray]:
        """Per-tensor mean squared activations, as llama-quantize passes them to the quantizer.

        ``sum / count`` per expert in float32, 1.0 for experts that never fired (counts
        rounded as llama.cpp rounds them on load). Legacy ``.dat`` files are handled
        by :func:`imatrix.formats.load_means`, which divides the file's raw values.
        """
        out: dict[str, np.ndarray] = {}
        for name, e in self.entries.items():
            vals = e.values.astype(np.float32).reshape(e.n_counts, e.row_size)
            counts = np.round(e.counts).astype(np.float32)
            res = np.ones_like(vals)
            live = counts > 0
            res[live] = vals[live] / counts[live, None]
            out[name] = res.reshape(-1)
        return out

    def validate(self, source: str) -> None:
        for name, e in self.entries.items():
            try:
                e.check(name)
            except ImatrixError as exc:
                raise ImatrixError(f"{source}: {exc}") from None


def _broadcast_counts(a: np.ndarray, n: int, name: str, src: str) -> np.ndarray:
    if a.size == n:
        return a
    if a.size == 1:
        return np.full(n, a[0], dtype=a.dtype)
    raise ImatrixError(f"{src}: tensor '{name}' has {a.size} counts, expected {n}")


def normalize_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Dataset weights scaled so the smallest is 1: no count ever shrinks below a token."""
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ImatrixError(f"{len(weights)} weights given for {n} inputs")
    w = [float(x) for x in weights]
    if any(not np.isfinite(x) or x <= 0 for x in w):
        raise ImatrixError(f"weights must be positive finite numbers, got {weights}")
    lo = min(w)
    return [x / lo for x in w]


#: One input to :func:`combine`: the data itself, or a zero-argument loader called
#: only when the fold reaches it (so only one input is held at a time).
CombineInput = ImatrixData | Callable[[], ImatrixData]


class _Fold:
    """The running total of :func:`combine`: float32 sums and float64 counts per tensor.

    Why a fold: a merge of many shards must not hold them all. Adding one input at a
    time into float32 accumulators, in input order, is exactly llama.cpp's arithmetic
    (its ``float`` accumulators round after each addition), so the bytes do not change.
    """

    def __init__(self, force: bool) -> None:
        self.force = force
        self.n = 0
        self.vals: dict[str, np.ndarray] = {}
        self.sums: dict[str, np.ndarray | None] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.shas: list[str] = []
        self.sizes: list[int] = []
        self.datasets: list[str] = []
        self.dataset_sha256: list[str] = []
        self.selection: list[str] = []
        self.tokenizer: str | None = None

    def add(self, data: ImatrixData, wi: float, src: str) -> None:
        self._headers(data)
        for name, e in data.entries.items():
            self._add_entry(name, e, wi, src)
        # a tensor missing from some input gets no activation sums: they would be partial
        for name in self.sums:
            if name not in data.entries:
                self.sums[name] = None
        self.n += 1

    def _headers(self, data: ImatrixData) -> None:
        sha = data.provenance.model_sha256
        if sha and sha not in self.shas:
            self.shas.append(sha)
            if len(self.shas) > 1 and not self.force:
                raise ImatrixError(
                    "inputs come from different models (model sha256 "
                    + ", ".join(sorted(s[:12] for s in self.shas))
                    + "); pass --force to combine anyway"
                )
        if not data.is_legacy and data.chunk_size > 0:
            self.sizes.append(data.chunk_size)
        self.datasets.extend(data.datasets)
        self.dataset_sha256.extend(data.provenance.dataset_sha256)
        self.selection.extend(data.selections())
        if self.tokenizer is None and data.provenance.tokenizer:
            self.tokenizer = data.provenance.tokenizer

    def _add_entry(self, name: str, e: Entry, wi: float, src: str) -> None:
        vals = e.values.astype(np.float32)  # a fresh array: safe to keep as the total
        sums = None if e.sums is None else e.sums.astype(np.float32)
        counts = e.counts.copy()
        if wi != 1.0:
            vals = (vals * np.float32(wi)).astype(np.float32)
            sums = None if sums is None else (sums * np.float32(wi)).astype(np.float32)
            counts = counts * wi
        if name not in self.vals:
            self.vals[name] = vals
            # a tensor first seen after the first input was missing from an earlier one
            self.sums[name] = sums if self.n == 0 else None
            self.counts[name] = counts
            return
        acc = self.vals[name]
        if acc.size != vals.size:
            raise ImatrixError(
                f"{src}: tensor '{name}' has {vals.size} values, earlier inputs have {acc.size}"
            )
        n = max(self.counts[name].size, counts.size)
        self.counts[name] = _broadcast_counts(self.counts[name], n, name, src) + (
            _broadcast_counts(counts, n, name, src)
        )
        acc += vals
        prev = self.sums[name]
        if prev is not None and sums is not None:
            prev += sums
        else:
            self.sums[name] = None

    def result(self, chunk_size: int | None) -> ImatrixData:
        """The combined data; the accumulators are released tensor by tensor."""
        if chunk_size is None:
            chunk_size = self.sizes[0] if self.sizes else DEFAULT_CHUNK_SIZE
            if len(set(self.sizes)) > 1:
                log.warning(
                    "inputs have different chunk sizes %s; using %d",
                    sorted(set(self.sizes)),
                    chunk_size,
                )
        for name, acc in self.vals.items():
            if acc.size % self.counts[name].size:
                raise ImatrixError(
                    f"tensor '{name}': values do not divide into counts after combining"
                )
        entries: dict[str, Entry] = {}
        for name in list(self.vals):
            vals = self.vals.pop(name)
            entries[name] = Entry(vals.astype(np.float64), self.counts[name], self.sums.pop(name))
            del vals
        out = ImatrixData(
            entries=entries,
            datasets=self.datasets,
            chunk_size=int(chunk_size),
            provenance=Provenance(
                model_sha256=self.shas[0] if len(self.shas) == 1 else None,
                dataset_sha256=self.dataset_sha256,
                tokenizer=self.tokenizer,
                dataset_selection=self.selection if any(self.selection) else [],
            ),
        )
        out.chunk_count = out.derived_chunk_count()
        return out


def combine(
    items: Iterable[CombineInput],
    *,
    weights: Sequence[float] | None = None,
    chunk_size: int | None = None,
    force: bool = False,
    sources: Sequence[str] | None = None,
) -> ImatrixData:
    """Add imatrices the way ``llama-imatrix --in-file A --in-file B ...`` does.

    Sums add in float32 in input order (so three inputs round after each addition,
    as llama.cpp's ``float`` accumulators do); counts add; a single count broadcasts
    over experts; datasets concatenate; the chunk count is ``max(count) // chunk_size``.
    A weight scales both the sums and the counts of its input. Inputs whose
    provenance names different models are refused unless ``force``, as soon as the
    second model appears.

    ``items`` is consumed one at a time, and a loader (a zero-argument callable) is
    called only when its turn comes, so memory stays at the running total plus one
    input however many there are; pass loaders (or a generator) to get that.
    """
    n_known = len(items) if isinstance(items, Sized) else None
    if n_known == 0:
        raise ImatrixError("nothing to combine")
    w = None if weights is None else normalize_weights(weights, n_known or len(weights))
    fold = _Fold(force)
    # no enumerate(): its reused result tuple would keep the previous input alive
    for item in items:
        i = fold.n
        if w is not None and i >= len(w):
            raise ImatrixError(f"{len(w)} weights given for more than {len(w)} inputs")
        src = sources[i] if sources is not None and i < len(sources) else f"input #{i + 1}"
        data = item if isinstance(item, ImatrixData) else item()
        fold.add(data, 1.0 if w is None else w[i], src)
        del data, item  # before the next load: two inputs are never held at once
    if fold.n == 0:
        raise ImatrixError("nothing to combine")
    if w is not None and fold.n != len(w):
        raise ImatrixError(f"{len(w)} weights given for {fold.n} inputs")
    return fold.result(chunk_size)
