"""Column sums of an input shared by consecutive matrices, computed once.

q/k/v (and gate/up, and the experts' gate/up) multiply the same input tensor one
after the other. Its column sums are computed once and reused while the memory they
were read from provably holds the same data: every node is asked about before it is
computed, so a node whose output overlaps that memory drops the cache first
(:meth:`SharedInputs.invalidate_if_written`). Only on the CPU backend (a single
split, no scheduler copies that are written without being asked about) and for host
memory.
"""

from __future__ import annotations

import ctypes

import numpy as np

from imatrix import ggml

#: identity of an input: tensor struct address, data pointer, shape and strides
Key = tuple[object, ...]
#: a byte range ``[lo, hi)`` of host memory
Span = tuple[int, int]
#: per matrix: (sum of squares, sum) of a dense input (sum None: not computed)
DenseParts = dict[int, tuple[np.ndarray, np.ndarray | None]]
#: experts touched, their sums of squares and sums (or None), tokens per expert
MoeParts = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]


def tensor_key(t: ggml.GGMLTensor) -> Key:
    return (ctypes.addressof(t), t.data, tuple(t.ne), tuple(t.nb))


def moe_key(src0: ggml.GGMLTensor, src1: ggml.GGMLTensor, ids: ggml.GGMLTensor) -> Key:
    """Identity of a ``MUL_MAT_ID``'s input: activations, expert ids, expert count."""
    return (*tensor_key(src1), *tensor_key(ids), int(src0.ne[2]))


def host_span(t: ggml.GGMLTensor) -> Span | None:
    """The host memory ``t`` occupies, or None when it lives on a device."""
    lib = ggml.libggml_base()
    if not t.data or (t.buffer and not lib.ggml_backend_buffer_is_host(t.buffer)):
        return None
    lo = int(t.data)
    return lo, lo + int(lib.ggml_nbytes(ctypes.addressof(t)))


class SharedInputs:
    """A one-entry cache of column sums, keyed by the input they were read from."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.n_reused = 0
        self._entry: tuple[Key, list[Span], DenseParts | MoeParts] | None = None

    @property
    def holding(self) -> bool:
        return self._entry is not None

    def clear(self) -> None:
        self._entry = None

    def invalidate_if_written(self, t: ggml.GGMLTensor) -> None:
        """Drop the cache when the node ``t`` is about to write memory it was read from."""
        if self._entry is None:
            return
        lo = int(t.data)
        hi = lo + int(ggml.libggml_base().ggml_nbytes(ctypes.addressof(t)))
        if any(lo < b and a < hi for a, b in self._entry[1]):
            self._entry = None

    def holds(self, key: Key) -> bool:
        """Whether the sums of ``key`` are cached (without counting a reuse)."""
        return self._entry is not None and self._entry[0] == key

    def get(self, key: Key) -> DenseParts | MoeParts | None:
        e = self._entry
        if e is not None and e[0] == key:
            self.n_reused += 1
            return e[2]
        return None

    def put(self, key: Key, spans: list[Span], value: DenseParts | MoeParts) -> None:
        if self.enabled:
            self._entry = (key, spans, value)


__all__ = ["DenseParts", "Key", "MoeParts", "SharedInputs", "host_span", "moe_key", "tensor_key"]
