"""Which chunks of a dataset each collect job takes.

The shards of a dataset cover its chunks exactly once, in order, which is what makes
the merge of the shards equal to one unsharded collection.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imatrix.errors import ImatrixError


def dataset_chunks(tokens: str | Path, n_ctx: int, limit: int | None = None) -> int:
    """Chunks of ``n_ctx`` tokens that collection takes from a tokens file, as
    llama-imatrix counts them (whole chunks only; at most ``limit``)."""
    n_tokens = int(np.load(tokens, mmap_mode="r").shape[0])
    n = n_tokens // n_ctx
    return min(n, limit) if limit else n


def shard_count(n_chunks: int, *, chunks_per_shard: int) -> int:
    """Shards of ``chunks_per_shard`` chunks needed for ``n_chunks`` (at least one)."""
    if chunks_per_shard < 1:
        raise ImatrixError(f"chunks per shard must be at least 1, got {chunks_per_shard}")
    return max(1, -(-n_chunks // chunks_per_shard))


def shard_range(
    n_chunks: int,
    shard: int,
    *,
    shards: int | None = None,
    chunks_per_shard: int | None = None,
    dataset: str = "dataset",
) -> tuple[int, int]:
    """The chunk range ``[first, last)`` of ``shard``.

    With ``chunks_per_shard`` consecutive blocks of that size (the last may be
    shorter); otherwise ``shards`` contiguous ranges whose sizes differ by at most one.
    """
    if chunks_per_shard is not None:
        total = shard_count(n_chunks, chunks_per_shard=chunks_per_shard)
        first, last = shard * chunks_per_shard, min((shard + 1) * chunks_per_shard, n_chunks)
    else:
        if shards is None or shards < 1:
            raise ImatrixError(f"shards must be at least 1, got {shards}")
        total = shards
        first, last = shard * n_chunks // shards, (shard + 1) * n_chunks // shards
    if not 0 <= shard < total:
        raise ImatrixError(f"{dataset}: shard {shard} does not exist (there are {total})")
    if n_chunks < total or first >= last:
        raise ImatrixError(
            f"{dataset}: {n_chunks} chunk(s) cannot fill {total} shards "
            "(lower collect.shards, or give the dataset more text)"
        )
    return first, last
