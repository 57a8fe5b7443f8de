"""Which chunks of a dataset are calibrated on: llama-imatrix's stream, a seeded sample,
or chunks that begin at document starts.

Why at tokenize time: the tokens file then holds exactly the chosen chunks, one after
the other, so collect, sharding, checkpoints and resume work on it unchanged (chunk
``k`` of the file is ``tokens[k*n_ctx:(k+1)*n_ctx]``, its first token replaced by BOS
when the model adds one, as llama-imatrix does with every chunk).

Boundaries:

- ``stream`` (the default, llama-imatrix's): the text tokenized as one piece, cut
  into whole chunks of ``n_ctx`` tokens; each chunk's first token becomes BOS when
  collect runs.
- ``document``: every chunk starts at a document start (a JSONL/Parquet record, or a
  blank-line-separated paragraph of a text file): BOS, then the next ``n_ctx - 1``
  tokens of the documents from there on (``n_ctx`` tokens and no BOS for a model
  that adds none). Each document is tokenized on its own, followed by a blank line
  (the seam of :data:`imatrix.workflow.datasets.RECORD_SEPARATOR`). A document
  shorter than that *continues into the next ones* (packing, as language models are
  trained): no padding token ever reaches the imatrix, and a corpus of short records
  still gives full chunks. The next chunk starts at the first document not yet
  touched, so no token is used twice; the rest of a long document is not used. An
  incomplete last chunk is dropped, as llama-imatrix drops a partial chunk.

Sampling (``sample: {chunks: N, seed: S}``) picks N of those candidate chunks at
random and keeps them *in the order drawn*, so any prefix of the file (a dataset's
``chunks`` limit, a shard, an early stop) is itself a uniform sample. The draw uses
only :meth:`random.Random.random` after ``random.Random(seed)`` with an integer seed:
Python documents exactly that (the compatible seeder and ``random()``) as stable
across versions, whereas ``sample``, ``shuffle`` and ``randrange`` have changed their
algorithms before and may again. The indices come from a partial Fisher-Yates shuffle
driven by ``random()`` (:func:`draw`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imatrix.errors import ImatrixError

if TYPE_CHECKING:
    from imatrix.llama_api import Model

#: llama-imatrix's contiguous stream of whole chunks
BOUNDARY_STREAM = "stream"
#: every chunk starts at a document start
BOUNDARY_DOCUMENT = "document"
BOUNDARIES = (BOUNDARY_STREAM, BOUNDARY_DOCUMENT)


@dataclass(frozen=True)
class Selection:
    """How a dataset's chunks are chosen: boundary mode and an optional seeded sample
    of ``chunks`` chunks; ``n_ctx`` is the chunk size collect will use."""

    n_ctx: int
    boundary: str = BOUNDARY_STREAM
    chunks: int | None = None
    seed: int = 0

    @property
    def is_plain(self) -> bool:
        """True for llama-imatrix's own way: the whole stream, in order."""
        return self.boundary == BOUNDARY_STREAM and self.chunks is None

    def check(self, where: str) -> None:
        """Refuse settings no dataset can have; ``where`` names the dataset."""
        if self.boundary not in BOUNDARIES:
            raise ImatrixError(
                f"{where}: unknown boundary '{self.boundary}' (known: {', '.join(BOUNDARIES)})"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ImatrixError(f"{where}: sample seed must be an integer >= 0, got {self.seed!r}")
        if self.chunks is not None and (isinstance(self.chunks, bool) or self.chunks < 1):
            raise ImatrixError(f"{where}: sample chunks must be at least 1, got {self.chunks!r}")
        if self.n_ctx < 2:
            raise ImatrixError(f"{where}: n_ctx must be at least 2, got {self.n_ctx}")

    def record(self) -> dict[str, Any]:
        """The settings as the tokens' record and the imatrix provenance keep them."""
        sample = None if self.chunks is None else {"chunks": self.chunks, "seed": self.seed}
        return {"boundary": self.boundary, "n_ctx": self.n_ctx, "sample": sample}


def draw(n_available: int, n: int, seed: int) -> list[int]:
    """``n`` distinct indices of ``range(n_available)`` in random order, the same for
    the same arguments on every Python version (see the module docstring)."""
    rng = random.Random(seed)
    pool = list(range(n_available))
    for i in range(n):
        j = i + int(rng.random() * (n_available - i))
        pool[i], pool[j] = pool[j], pool[i]
    return pool[:n]


def stream_chunks(tokens: np.ndarray, n_ctx: int) -> tuple[np.ndarray, list[int]]:
    """The whole chunks of a token stream (rows) and each one's token offset."""
    n = tokens.size // n_ctx
    return tokens[: n * n_ctx].reshape(n, n_ctx), [k * n_ctx for k in range(n)]


def document_chunks(
    docs: Sequence[np.ndarray], n_ctx: int, bos: int | None
) -> tuple[np.ndarray, list[int]]:
    """Chunks that start at document starts (rows) and the document each starts at.

    ``docs`` are the documents' tokens without BOS; ``bos`` None for a model that adds
    none. See the module docstring for short and long documents.
    """
    body = n_ctx - 1 if bos is not None else n_ctx
    flat = np.concatenate([np.zeros(0, np.int32), *(np.asarray(d, np.int32) for d in docs)])
    begins = np.cumsum([0] + [len(d) for d in docs[:-1]], dtype=np.int64)
    rows: list[np.ndarray] = []
    starts: list[int] = []
    i = 0
    while i < len(docs) and begins[i] + body <= flat.size:
        b = int(begins[i])
        piece = flat[b : b + body]
        rows.append(piece if bos is None else np.concatenate([[bos], piece]))
        starts.append(i)
        i = max(i + 1, int(np.searchsorted(begins, b + body, side="left")))
    if not rows:
        return np.zeros((0, n_ctx), dtype=np.int32), []
    return np.stack(rows).astype(np.int32), starts


def select(
    rows: np.ndarray, starts: list[int], sel: Selection, where: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """The chosen chunks as one token array, and the record of the choice.

    Without a sample every candidate is kept in order; with one, ``sel.chunks`` drawn
    with :func:`draw`. Too few candidates is an error naming ``where`` (the dataset).
    """
    available = int(rows.shape[0])
    if available == 0:
        raise ImatrixError(
            f"{where}: no complete chunk of {sel.n_ctx} tokens (boundary: {sel.boundary})"
        )
    if sel.chunks is None:
        picked = list(range(available))
    elif sel.chunks > available:
        raise ImatrixError(
            f"{where}: sample of {sel.chunks} chunks asked for, but the text gives only "
            f"{available} chunks of {sel.n_ctx} tokens (boundary: {sel.boundary})"
        )
    else:
        picked = draw(available, sel.chunks, sel.seed)
    record = {
        **sel.record(),
        "chunks_available": available,
        "chunk_starts": [starts[k] for k in picked],
        "chunk_starts_are": "document" if sel.boundary == BOUNDARY_DOCUMENT else "token",
    }
    return rows[picked].reshape(-1).astype(np.int32), record


def selected_tokens(
    model: Model,
    path: str | Path,
    sel: Selection,
    *,
    parse_special: bool,
    fmt: str,
    text_column: str,
    where: str,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The tokens of ``sel``'s chunks of the dataset file ``path`` and the record of the
    choice: the stream tokenized as llama-imatrix tokenizes it, or the documents
    (records, or paragraphs of a text file) each tokenized on its own."""
    from imatrix.llama_api import tokenize
    from imatrix.tokenize import read_text, tokenize_text

    sel.check(where)
    if sel.boundary == BOUNDARY_STREAM:
        stream = tokenize_text(model, read_text(path), parse_special=parse_special)
        rows, starts = stream_chunks(stream, sel.n_ctx)
    else:
        from imatrix.workflow.datasets import RECORD_SEPARATOR, load_documents

        docs = [
            tokenize(model, d + RECORD_SEPARATOR, add_special=False, parse_special=parse_special)
            for d in load_documents(path, fmt, text_column)
        ]
        rows, starts = document_chunks(docs, sel.n_ctx, model.bos if model.add_bos else None)
    return select(rows, starts, sel, where)


__all__ = [
    "BOUNDARIES",
    "BOUNDARY_DOCUMENT",
    "BOUNDARY_STREAM",
    "Selection",
    "document_chunks",
    "draw",
    "select",
    "selected_tokens",
    "stream_chunks",
]
