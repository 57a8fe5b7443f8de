"""Calibration text -> tokens, exactly as llama-imatrix tokenizes its ``-f`` file.

Why its own step: tokenizing is cheap but not free on large datasets, depends only on
the text and the model's vocabulary, and every shard of a dataset needs the same
tokens; the workflow tokenizes once and caches an int32 ``.npy`` with a JSON record
beside it (counts, sha256s, tokenizer settings) that later steps copy into the
imatrix's provenance.

The two files cannot be written in one atomic step, so the record names the tokens it
describes (``tokens_sha256``, over the int32 little-endian token bytes), is written
*first*, and :func:`load_tokens` refuses a ``.npy`` whose tokens are not the ones its
record names. A kill between the two writes therefore leaves either a new record
beside the old tokens (refused: tokenize again) or a new record alone (no tokens
file); never a pair that silently disagrees.

What llama-imatrix does, and we repeat: read the file as bytes, drop one trailing
newline (``-f`` does), and tokenize the whole text at once with ``add_special=true``
(BOS when the model adds one) and ``parse_special`` as given (``common_tokenize``).
The model is loaded ``vocab_only``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from imatrix import __version__
from imatrix.atomic import atomic_write
from imatrix.errors import ImatrixError
from imatrix.hashing import sha256_file
from imatrix.llama_api import Model, load_model, tokenize
from imatrix.sampling import Selection, selected_tokens

log = logging.getLogger(__name__)

#: keys of the model that decide how text becomes tokens (recorded in the JSON)
_TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
)


def read_text(path: str | Path) -> bytes:
    """The file's bytes with one trailing newline removed, as llama.cpp's ``-f`` reads it."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError as exc:
        raise ImatrixError(f"{p}: no such text file") from exc
    except IsADirectoryError as exc:
        raise ImatrixError(f"{p}: is a directory, not a text file") from exc
    except OSError as exc:
        raise ImatrixError(f"{p}: cannot read: {exc.strerror or exc}") from exc
    if data.endswith(b"\n"):
        data = data[:-1]
    return data


def tokenizer_settings(model: Model, *, parse_special: bool) -> dict[str, Any]:
    """The facts that decide tokenization, as a JSON-ready dict."""
    meta = {k: model.meta(k) for k in _TOKENIZER_KEYS}
    return {
        "add_bos": model.add_bos,
        "add_eos": model.add_eos,
        "bos": model.bos,
        "parse_special": bool(parse_special),
        "add_special": True,
        "n_vocab": model.n_vocab,
        "vocab_type": model.vocab_type,
        "meta": {k: v for k, v in meta.items() if v is not None},
    }


def tokenizer_json(settings: dict[str, Any]) -> str:
    """Canonical JSON text of :func:`tokenizer_settings` (for ``Provenance.tokenizer``)."""
    return json.dumps(settings, sort_keys=True, separators=(",", ":"))


def tokenize_text(model: Model, data: bytes, *, parse_special: bool = False) -> np.ndarray:
    """Tokens of ``data`` (already read with :func:`read_text`) as llama-imatrix makes them."""
    return tokenize(model, data, add_special=True, parse_special=parse_special)


def tokens_sha256(tokens: np.ndarray) -> str:
    """sha256 of the tokens as int32 little-endian bytes (what the record names)."""
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype="<i4").tobytes()).hexdigest()


def tokenize_file(
    model: str | Path,
    text: str | Path,
    output: str | Path,
    *,
    parse_special: bool = False,
    model_sha256: str | None = None,
    selection: Selection | None = None,
    fmt: str = "auto",
    text_column: str = "text",
    dataset: str | None = None,
) -> dict[str, Any]:
    """Tokenize ``text`` with ``model``'s vocabulary into ``output`` (int32 ``.npy``).

    Also writes ``output.with_suffix('.json')``: n_tokens, the text's and the model's
    sha256 (``model_sha256`` skips hashing when the caller knows it), the tokens'
    sha256, add_bos, parse_special, n_vocab and the tokenizer settings. Both files are
    written atomically, the record first (see the module docstring). Returns the JSON
    record.

    ``selection`` (other than the plain stream) keeps only the chunks it chooses
    (:mod:`imatrix.sampling`; ``text`` may then be a JSONL/Parquet dataset of format
    ``fmt`` when it asks for document boundaries) and records the choice under
    ``selection``; errors name ``dataset`` (default: the text file).
    """
    out = Path(output)
    sel = None if selection is None or selection.is_plain else selection
    data = read_text(text) if sel is None else b""  # read first: a missing file's error
    if sel is not None and not Path(text).is_file():
        raise ImatrixError(f"{text}: no such dataset file")
    text_sha = sha256_file(text)
    msha = model_sha256 or sha256_file(model)
    chosen: dict[str, Any] | None = None
    with load_model(model, vocab_only=True) as m:
        if sel is None:
            tokens = tokenize_text(m, data, parse_special=parse_special)
        else:
            where = f"dataset '{dataset}'" if dataset else str(text)
            tokens, chosen = selected_tokens(
                m,
                text,
                sel,
                parse_special=parse_special,
                fmt=fmt,
                text_column=text_column,
                where=where,
            )
        settings = tokenizer_settings(m, parse_special=parse_special)
    log.info("%s: %d tokens", text, tokens.size)
    tokens = tokens.astype(np.int32)
    record = {
        "n_tokens": int(tokens.size),
        "tokens_sha256": tokens_sha256(tokens),
        "text": str(text),
        "text_sha256": text_sha,
        "model": str(model),
        "model_sha256": msha,
        "add_bos": settings["add_bos"],
        "parse_special": bool(parse_special),
        "n_vocab": settings["n_vocab"],
        "tokenizer": settings,
        "version": __version__,
    }
    if chosen is not None:  # the chunks are pinned by the tokens' sha256
        record["selection"] = {**chosen, "tokens_sha256": record["tokens_sha256"]}
    _write_tokens(out, tokens, record)
    return record


def _write_tokens(out: Path, tokens: np.ndarray, record: dict[str, Any]) -> None:
    """The record, then the tokens, each atomically (see the module docstring)."""
    buf = io.BytesIO()
    np.save(buf, tokens, allow_pickle=False)
    atomic_write(out.with_suffix(".json"), (json.dumps(record, indent=2) + "\n").encode())
    atomic_write(out, buf.getvalue())


def load_tokens(path: str | Path) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Tokens from a ``.npy`` written by :func:`tokenize_file`, and its JSON record if
    present; refuses a record that describes other tokens (another run's, or one killed
    between its two writes)."""
    p = Path(path)
    try:
        arr = np.load(p, allow_pickle=False)
    except FileNotFoundError as exc:
        raise ImatrixError(f"{p}: no such tokens file") from exc
    except (OSError, ValueError) as exc:
        raise ImatrixError(f"{p}: not a tokens .npy file ({exc})") from exc
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ImatrixError(
            f"{p}: expected a 1-D integer array of tokens, got {arr.dtype} {arr.shape}"
        )
    meta = None
    j = p.with_suffix(".json")
    if j.is_file():
        try:
            meta = json.loads(j.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ImatrixError(f"{j}: unreadable tokens record ({exc})") from exc
        want = meta.get("tokens_sha256")  # records written before it: n_tokens only
        if want is not None and want != tokens_sha256(arr):
            raise ImatrixError(
                f"{j}: records other tokens than {p} holds (sha256 {str(want)[:12]} vs "
                f"{tokens_sha256(arr)[:12]}; a tokenize run was interrupted?); tokenize again"
            )
        if meta.get("n_tokens") not in (None, int(arr.size)):
            raise ImatrixError(
                f"{j}: records {meta.get('n_tokens')} tokens but {p} holds {arr.size}"
            )
    return arr.astype(np.int32, copy=False), meta
