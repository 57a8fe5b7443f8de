"""Which tokens go into which decode: chunks, sequences per batch, BOS.

This follows ``compute_imatrix`` in llama.cpp's tools/imatrix/imatrix.cpp: chunk ``k``
is ``tokens[k*n_ctx:(k+1)*n_ctx]``; ``n_batch // n_ctx`` chunks are decoded side by
side as parallel sequences (a *group*), each in batches of at most ``n_batch``
tokens; BOS replaces a chunk's first token when the model adds BOS. Everything here
is pure arithmetic on arrays, so it is tested without a model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from imatrix.collect.settings import CollectSettings
from imatrix.errors import ImatrixError
from imatrix.model import Provenance

#: query rows per tile of the CPU flash-attention kernel (``GGML_FA_TILE_Q`` in the
#: pinned ggml's ggml-cpu/common.h); a sequence with fewer rows in a ubatch is computed
#: by another kernel, with other rounding
FA_TILE_ROWS = 64


def plan_batches(n_ctx: int, n_batch: int) -> tuple[int, int, int]:
    """``(n_seq, n_kv, n_batch)`` as llama-imatrix derives them from ``-c`` and ``-b``."""
    if n_ctx <= 0:
        raise ImatrixError(f"n_ctx must be positive, got {n_ctx}")
    if n_batch <= 0:
        raise ImatrixError(f"n_batch must be positive, got {n_batch}")
    n_seq = max(1, n_batch // n_ctx)
    n_kv = n_seq * n_ctx
    return n_seq, n_kv, min(n_batch, n_kv)


def ubatch_order(n_seq: int, size: int, rows: int) -> np.ndarray:
    """The tokens of a batch of ``n_seq`` sequences of ``size`` tokens each (sequences
    one after the other) in the order llama.cpp's equal split computes them: ``rows``
    tokens of every sequence per ubatch, sequence by sequence."""
    idx = np.arange(n_seq * size).reshape(n_seq, size)
    return np.concatenate([idx[:, b : b + rows].reshape(-1) for b in range(0, size, rows)])


@dataclass(frozen=True)
class BatchSpec:
    """One ``llama_decode`` of a group: ``size`` tokens of each sequence from position
    ``start`` on, in blocks of ``block`` tokens of every sequence (0: one block,
    sequences one after the other)."""

    start: int
    size: int
    tokens: np.ndarray
    positions: np.ndarray
    seq_ids: np.ndarray
    block: int = 0

    @property
    def n_seq(self) -> int:
        return self.tokens.size // self.size

    def runs(self, s: int, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
        """Where tokens ``[lo, hi)`` of sequence ``s`` (offsets from ``start``) sit in
        the batch: ``(first row, first offset, count)`` of each contiguous run."""
        block = self.block or self.size
        j = lo
        while j < hi:
            b0 = j - j % block
            width = min(block, self.size - b0)
            count = min(hi, b0 + width) - j
            yield b0 * self.n_seq + s * width + j - b0, j, count
            j += count


@dataclass(frozen=True)
class ChunkPlan:
    """The chunk range of a collection and how its chunks are batched."""

    tokens: np.ndarray
    n_ctx: int
    first: int
    last: int
    n_seq: int
    n_kv: int
    n_batch: int

    @property
    def n_chunks(self) -> int:
        return self.last - self.first

    @property
    def batches_per_chunk(self) -> int:
        return (self.n_ctx + self.n_batch - 1) // self.n_batch

    def chunk(self, k: int) -> np.ndarray:
        """The tokens of chunk ``k`` (a view)."""
        return self.tokens[k * self.n_ctx : (k + 1) * self.n_ctx]

    def groups(self, start: int) -> Iterator[tuple[int, int]]:
        """``(first chunk, number of chunks)`` of each group from chunk ``start`` on."""
        for g0 in range(start, self.last, self.n_seq):
            yield g0, min(self.n_seq, self.last - g0)

    def batches(self, g0: int, n_seq: int, bos: int | None) -> Iterator[BatchSpec]:
        """The decodes of the group of ``n_seq`` chunks from ``g0``; ``bos`` (None: the
        model adds none) replaces each chunk's first token."""
        for j in range(self.batches_per_chunk):
            b0 = j * self.n_batch
            bs = min(self.n_ctx - b0, self.n_batch)
            starts = [(g0 + s) * self.n_ctx + b0 for s in range(n_seq)]
            rows = [self.tokens[c0 : c0 + bs] for c0 in starts]
            seq_tok = np.stack(rows)  # a copy: BOS must not reach the caller's tokens
            if bos is not None and j == 0:
                seq_tok[:, 0] = bos
            yield BatchSpec(
                start=b0,
                size=bs,
                tokens=seq_tok.reshape(-1),
                positions=np.tile(np.arange(b0, b0 + bs, dtype=np.int32), n_seq),
                seq_ids=np.repeat(np.arange(n_seq, dtype=np.int32), bs),
            )

    def abort_split(self, n: int, n_ubatch: int) -> int:
        """Sequences per decode when the decodes of a group of ``n`` chunks may each end
        by aborting their only ubatch right after the last needed tensor; 0: they may
        not. llama.cpp drops an aborted ubatch's cache entries, so a ubatch must hold
        whole chunks. Decoding them that way must also give llama-imatrix's numbers:
        llama-imatrix's ubatch takes ``n_ubatch // n`` rows of each of the group's
        sequences, ours every row of fewer sequences, and the CPU attention kernel
        changes with the rows per sequence unless both are whole tiles of
        :data:`FA_TILE_ROWS`. (A group that fits one ubatch is decoded as llama-imatrix
        decodes it.)"""
        if self.batches_per_chunk != 1 or self.n_ctx > n_ubatch:
            return 0
        per = n_ubatch // self.n_ctx
        if n <= per:
            return n
        rows = n_ubatch // n  # llama-imatrix's rows of each sequence per ubatch
        if rows % FA_TILE_ROWS or self.n_ctx % rows:
            return 0
        return per

    @staticmethod
    def interleave(spec: BatchSpec, n_ubatch: int) -> BatchSpec:
        """``spec``'s tokens in the order llama.cpp computes them (:func:`ubatch_order`)
        when its equal split makes ubatches of ``n_ubatch // n_seq`` tokens of every
        sequence: the ubatches are the same as in ``spec``'s order, but their outputs
        come out in batch order, so reading the logits costs no reordering (llama.cpp
        swaps the rows of an out-of-order batch into place on the first access,
        ``2 x n_vocab`` floats per swap)."""
        n = spec.n_seq
        rows = n_ubatch // n
        if n == 1 or rows < 1 or rows >= spec.size:
            return spec
        order = ubatch_order(n, spec.size, rows)
        return replace(
            spec,
            tokens=spec.tokens[order],
            positions=spec.positions[order],
            seq_ids=spec.seq_ids[order],
            block=rows,
        )

    @staticmethod
    def split(spec: BatchSpec, per_decode: int) -> Iterator[BatchSpec]:
        """``spec``'s sequences in decodes of ``per_decode`` whole sequences each (their
        sequence ids, and so their cache streams, unchanged); ``spec`` has them one
        after the other."""
        if spec.block:
            raise ValueError("split needs the sequences one after the other")
        n_seq = spec.n_seq
        step = per_decode * spec.size
        for s0 in range(0, n_seq, per_decode):
            lo, hi = s0 * spec.size, min(n_seq * spec.size, s0 * spec.size + step)
            yield BatchSpec(
                spec.start,
                spec.size,
                spec.tokens[lo:hi],
                spec.positions[lo:hi],
                spec.seq_ids[lo:hi],
            )


def plan_chunks(tokens: np.ndarray, settings: CollectSettings) -> ChunkPlan:
    """The plan of ``settings``' chunk range over ``tokens``; refuses a range outside
    the data (the library takes any valid ``[first, last)``, no 2-chunk minimum)."""
    n_ctx = settings.n_ctx
    n_seq, n_kv, n_batch = plan_batches(n_ctx, settings.n_batch)
    n_chunk_max = tokens.size // n_ctx
    last = n_chunk_max if settings.last_chunk is None else int(settings.last_chunk)
    first = int(settings.first_chunk)
    if not 0 <= first < last <= n_chunk_max:
        raise ImatrixError(
            f"chunk range [{first}, {last}) is not within the {n_chunk_max} chunks of {n_ctx} "
            f"tokens in the data ({tokens.size} tokens)"
        )
    return ChunkPlan(tokens, n_ctx, first, last, n_seq, n_kv, n_batch)


@dataclass(frozen=True)
class TokenSource:
    """Tokens to collect over, the dataset name to record, and the tokens file's record."""

    tokens: np.ndarray
    dataset: str | None
    meta: dict[str, Any] | None


def load_token_source(tokens: str | Path | np.ndarray, dataset: str | None) -> TokenSource:
    """An int32 array as is, or a ``.npy`` from :func:`imatrix.tokenize.tokenize_file`
    (``dataset`` defaults to the text path its record names, else the file's path)."""
    if isinstance(tokens, np.ndarray):
        arr = np.ascontiguousarray(tokens, dtype=np.int32)
        if arr.ndim != 1:
            raise ImatrixError(f"tokens must be a 1-D array, got shape {arr.shape}")
        return TokenSource(arr, dataset, None)
    from imatrix.tokenize import load_tokens

    arr, meta = load_tokens(tokens)
    if dataset is None:
        dataset = str(meta["text"]) if meta and meta.get("text") else str(tokens)
    return TokenSource(arr, dataset, meta)


def provenance_for(given: Provenance | None, meta: dict[str, Any] | None) -> Provenance:
    """``given``, or when it names no model, what a tokens file's record says."""
    prov = given or Provenance()
    if not meta or prov.model_sha256:
        return prov
    tokenizer = meta.get("tokenizer")
    return Provenance(
        model_sha256=meta.get("model_sha256"),
        dataset_sha256=[meta["text_sha256"]] if meta.get("text_sha256") else [],
        tokenizer=json.dumps(tokenizer, sort_keys=True, separators=(",", ":"))
        if tokenizer
        else None,
        dataset_selection=[selection_json(meta["selection"])] if meta.get("selection") else [],
    )


def selection_json(record: dict[str, Any]) -> str:
    """Canonical JSON of a tokens record's ``selection`` for the provenance, without the
    chunk list (the tokens' sha256 it holds pins the chunks)."""
    keep = {k: v for k, v in record.items() if k != "chunk_starts"}
    return json.dumps(keep, sort_keys=True, separators=(",", ":"))


__all__ = [
    "BatchSpec",
    "ChunkPlan",
    "TokenSource",
    "load_token_source",
    "plan_batches",
    "plan_chunks",
    "provenance_for",
    "ubatch_order",
]
