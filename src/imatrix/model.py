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
from collections.abc import Sequence
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


def combine(
    items: Sequence[ImatrixData],
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
    provenance names different models are refused unless ``force``.
    """
    if not items:
        raise ImatrixError("nothing to combine")
    names = list(sources) if sources is not None else [f"input #{i + 1}" for i in range(len(items))]
    w = normalize_weights(weights, len(items))
    shas = {d.provenance.model_sha256 for d in items if d.provenance.model_sha256}
    if len(shas) > 1 and not force:
        raise ImatrixError(
            "inputs come from different models (model sha256 "
            + ", ".join(sorted(s[:12] for s in shas))
            + "); pass --force to combine anyway"
        )
    if chunk_size is None:
        sizes = [d.chunk_size for d in items if not d.is_legacy and d.chunk_size > 0]
        chunk_size = sizes[0] if sizes else DEFAULT_CHUNK_SIZE
        if len(set(sizes)) > 1:
            log.warning(
                "inputs have different chunk sizes %s; using %d", sorted(set(sizes)), chunk_size
            )

    acc_vals: dict[str, np.ndarray] = {}
    acc_sums: dict[str, np.ndarray | None] = {}
    acc_counts: dict[str, np.ndarray] = {}
    for data, wi, src in zip(items, w, names, strict=True):
        for name, e in data.entries.items():
            vals = e.values.astype(np.float32)
            sums = None if e.sums is None else e.sums.astype(np.float32)
            counts = e.counts.copy()
            if wi != 1.0:
                vals = (vals * np.float32(wi)).astype(np.float32)
                sums = None if sums is None else (sums * np.float32(wi)).astype(np.float32)
                counts = counts * wi
            if name not in acc_vals:
                acc_vals[name] = vals.copy()
                acc_sums[name] = None if sums is None else sums.copy()
                acc_counts[name] = counts
                continue
            if acc_vals[name].size != vals.size:
                raise ImatrixError(
                    f"{src}: tensor '{name}' has {vals.size} values, "
                    f"earlier inputs have {acc_vals[name].size}"
                )
            n = max(acc_counts[name].size, counts.size)
            acc_counts[name] = _broadcast_counts(acc_counts[name], n, name, src) + (
                _broadcast_counts(counts, n, name, src)
            )
            acc_vals[name] += vals
            prev = acc_sums[name]
            acc_sums[name] = None if prev is None or sums is None else prev + sums
    for name in acc_vals:
        if acc_vals[name].size % acc_counts[name].size:
            raise ImatrixError(f"tensor '{name}': values do not divide into counts after combining")
    # a tensor missing from some input gets no activation sums: they would be partial
    for data in items:
        for name in acc_sums:
            if name not in data.entries:
                acc_sums[name] = None
    entries = {
        n: Entry(acc_vals[n].astype(np.float64), acc_counts[n], acc_sums[n]) for n in acc_vals
    }
    out = ImatrixData(
        entries=entries,
        datasets=[ds for d in items for ds in d.datasets],
        chunk_size=int(chunk_size),
        provenance=Provenance(
            model_sha256=next(iter(shas)) if len(shas) == 1 else None,
            dataset_sha256=[s for d in items for s in d.provenance.dataset_sha256],
            tokenizer=next((d.provenance.tokenizer for d in items if d.provenance.tokenizer), None),
        ),
    )
    out.chunk_count = out.derived_chunk_count()
    return out
