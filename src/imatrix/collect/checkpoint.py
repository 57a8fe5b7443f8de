"""Checkpoints: the state of a collection, saved beside its output, and resuming from it.

Every ``output_frequency`` chunks the data so far go to ``<output>.checkpoint``: our
GGUF layout plus the chunk reached and, in one ``imatrix_pipeline.checkpoint`` key,
the exact counts, the perplexity state and the settings' *signature*. A checkpoint
carries a sha256 of everything a resume takes from it, so a truncated or damaged one
is ignored with a warning (the run starts over), never trusted; a sound one made with
other settings is refused (:class:`StaleCheckpoint`): resuming from it would silently
mix two different computations.

A checkpoint off the ``output_frequency`` cadence (one written on SIGTERM, see
:mod:`.termination`) is *exact*: the running sums have not been rounded to float32 at
that chunk, so its state also carries them in float64 (``exact``, base64 of the
little-endian bytes), and a run resumed from it continues from the very state the
uninterrupted run had there.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imatrix.atomic import atomic_write
from imatrix.constants import PROVENANCE_PREFIX
from imatrix.errors import ImatrixError
from imatrix.formats import read_imatrix, to_gguf_bytes
from imatrix.gguf_io import read_gguf
from imatrix.model import Entry, ImatrixData
from imatrix.perplexity import Perplexity
from imatrix.tokenize import tokens_sha256

log = logging.getLogger(__package__)  # one logger name for the whole collector

KEY_CHECKPOINT_STATE = PROVENANCE_PREFIX + "checkpoint"
CHECKPOINT_SUFFIX = ".checkpoint"
#: the state's entry for the convergence record (:mod:`.convergence`)
CONVERGENCE_STATE_KEY = "convergence"

#: what a signature holds: every setting that changes what the chunks contribute
Signature = dict[str, Any]


def checkpoint_path(output: str | Path) -> Path:
    return Path(str(output) + CHECKPOINT_SUFFIX)


class CorruptCheckpoint(ImatrixError):
    """A checkpoint that cannot be trusted (truncated, damaged, not a checkpoint): a
    resuming run ignores it with a warning and starts over."""


class StaleCheckpoint(ImatrixError):
    """A sound checkpoint of other settings: the CLI refuses it (the user decides), the
    workflow discards it, since a config change has made the job's old work obsolete."""


def signature(
    *,
    model_sha: str | None,
    tokens: np.ndarray,
    n_ctx: int,
    first: int,
    last: int,
    dataset: str | None,
    process_output: bool,
    base: ImatrixData | None,
    until_converged: dict[str, Any] | None = None,
    sums: bool = True,
) -> Signature:
    """The settings a checkpoint must have been made with to be resumed from: the
    model, the tokens and the name recorded for them, ``-c``, the chunk range,
    ``--process-output``, and the ``--in-file`` data (its datasets, and with one its
    sums: two inputs of the same datasets may hold different data), and the
    ``--until-converged`` rule (it decides where the run ends), and whether plain sums
    are kept (not for llama-imatrix's formats: resumed for ours, they would be partial).
    """
    sig: Signature = {
        "model_sha256": model_sha,
        "tokens_sha256": tokens_sha256(tokens),
        "n_ctx": n_ctx,
        "first_chunk": first,
        "last_chunk": last,
        "dataset": dataset,
        "process_output": process_output,
        "base_datasets": list(base.datasets) if base is not None else [],
    }
    if base is not None:  # absent without one: older checkpoints stay valid
        sig["base_sha256"] = _data_digest(base)
    if until_converged is not None:  # likewise absent without one
        sig["until_converged"] = until_converged
    if not sums:  # likewise absent when kept
        sig["activation_sums"] = False
    return sig


def _hash_entries(h: Any, entries: dict[str, Entry], dtype: str) -> None:
    for name in sorted(entries):
        e = entries[name]
        h.update(name.encode("utf-8") + b"\0")
        for arr in (e.values, e.counts, e.sums):
            if arr is not None:
                h.update(np.ascontiguousarray(arr, dtype=dtype).tobytes())


def _data_digest(data: ImatrixData) -> str:
    """sha256 of an imatrix's datasets and float64 sums and counts."""
    h = hashlib.sha256(json.dumps(list(data.datasets)).encode())
    _hash_entries(h, data.entries, "<f8")
    return h.hexdigest()


def checkpoint_due(g0: int, reached: int, *, first: int, last: int, frequency: int) -> bool:
    """Whether the group of chunks ``[g0, reached)`` ends with a checkpoint: when it
    crosses a multiple of ``frequency`` chunks counted from ``first``, unless it is the
    last group (the output follows at once)."""
    return (
        reached < last
        and frequency > 0
        and (reached - first) // frequency > (g0 - first) // frequency
    )


def checkpoint_digest(data: ImatrixData, state: dict[str, Any]) -> str:
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
    _hash_entries(h, data.entries, "<f4")
    return h.hexdigest()


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f8").tobytes()).decode("ascii")


def _from_b64(text: str, size: int, what: str) -> np.ndarray:
    arr = np.frombuffer(base64.b64decode(text, validate=True), dtype="<f8")
    if arr.size != size:
        raise CorruptCheckpoint(f"{what}: {arr.size} exact sums for {size} values")
    return arr.astype(np.float64)


def exact_sums(entries: dict[str, Entry]) -> dict[str, dict[str, str | None]]:
    """The float64 sums of ``entries``, for an exact checkpoint's state."""
    return {
        n: {"values": _b64(e.values), "sums": None if e.sums is None else _b64(e.sums)}
        for n, e in entries.items()
    }


def write_checkpoint(
    path: Path,
    data: ImatrixData,
    sig: Signature,
    counts: dict[str, list[int]],
    ppl: Perplexity | None,
    verbosity: int,
    exact: dict[str, dict[str, str | None]] | None = None,
    convergence: dict[str, Any] | None = None,
) -> None:
    """Write ``data`` (with ``chunk_reached`` set) and its state atomically to ``path``
    (``exact``: :func:`exact_sums` of the running sums, for a checkpoint off the cadence;
    ``convergence``: the convergence tracker's state)."""
    state: dict[str, Any] = {
        "signature": sig,
        "counts": counts,
        "ppl": None if ppl is None else ppl.state(),
    }
    if exact is not None:
        state["exact"] = exact
    if convergence is not None:
        state[CONVERGENCE_STATE_KEY] = convergence
    state["sha256"] = checkpoint_digest(data, state)
    payload = to_gguf_bytes(
        data, extra={KEY_CHECKPOINT_STATE: json.dumps(state, separators=(",", ":"))}
    )
    atomic_write(path, payload)
    (log.info if verbosity >= 1 else log.debug)(
        "checkpoint: %d chunks in %s", data.provenance.chunk_reached or 0, path
    )


def _read_state(path: Path) -> tuple[ImatrixData, dict[str, Any]]:
    """Data and verified state of a checkpoint file (:class:`CorruptCheckpoint` if
    it cannot be trusted)."""
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
    if digest != checkpoint_digest(data, state):
        raise CorruptCheckpoint(
            f"ignoring {path}: "
            + ("no checksum" if digest is None else "checksum mismatch (the file is damaged)")
        )
    return data, state


def load_checkpoint(path: Path, sig: Signature) -> tuple[ImatrixData, int, dict[str, Any]]:
    """Data, chunk reached and state of a checkpoint made with the settings ``sig``.

    Raises :class:`CorruptCheckpoint` for a file that cannot be trusted and
    :class:`StaleCheckpoint` for a sound checkpoint of other settings."""
    data, state = _read_state(path)
    theirs = state.get("signature", {})
    diff = sorted(k for k in {*sig, *theirs} if theirs.get(k) != sig.get(k))
    if diff:
        raise StaleCheckpoint(
            f"{path}: checkpoint was made with different settings ({', '.join(diff)}); "
            "delete it or run without --resume"
        )
    reached = int(data.provenance.chunk_reached or 0)
    if not sig["first_chunk"] <= reached <= sig["last_chunk"]:
        raise StaleCheckpoint(
            f"{path}: checkpoint chunk {reached} is outside the range being collected"
        )
    for name, counts in state.get("counts", {}).items():
        if name in data.entries:
            data.entries[name].counts = np.asarray(counts, dtype=np.float64)
    _restore_exact(data, state.get("exact") or {}, path)
    return data, reached, state


def _restore_exact(data: ImatrixData, exact: dict[str, Any], path: Path) -> None:
    """Put an exact checkpoint's float64 sums in place of the file's float32 ones."""
    try:
        for name, sums in exact.items():
            e = data.entries[name]
            e.values = _from_b64(sums["values"], e.values.size, f"{path}: '{name}'")
            if sums["sums"] is not None and e.sums is not None:
                e.sums = _from_b64(sums["sums"], e.sums.size, f"{path}: '{name}'")
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpoint(f"ignoring {path}: corrupt exact sums ({exc})") from exc


@dataclass
class StartPoint:
    """Where a collection starts: its first chunk, the sums so far, the perplexity so
    far, the chunk it resumed from (None: not resumed) and the checkpoint's convergence
    state (None: a fresh start, or a checkpoint without one)."""

    chunk: int
    entries: dict[str, Entry]
    ppl: Perplexity | None
    resumed_from: int | None = None
    convergence: dict[str, Any] | None = None


def start_point(
    ckpt: Path | None,
    sig: Signature,
    *,
    resume: bool,
    first: int,
    base: ImatrixData | None,
    compute_ppl: bool,
) -> StartPoint:
    """Resume from ``ckpt`` when asked to and it is sound, else start at ``first`` from
    ``base``'s data (``--in-file``) or nothing."""
    entries = {n: e.copy() for n, e in base.entries.items()} if base else {}
    fresh = StartPoint(first, entries, Perplexity() if compute_ppl else None)
    if ckpt is None or not ckpt.is_file():
        return fresh
    if not resume:
        log.warning("ignoring existing checkpoint %s (no --resume); it will be replaced", ckpt)
        return fresh
    try:
        data, reached, state = load_checkpoint(ckpt, sig)
    except CorruptCheckpoint as exc:
        log.warning("%s; starting from chunk %d", exc, first)
        return fresh
    ppl = fresh.ppl
    if compute_ppl and state.get("ppl") is not None:
        ppl = Perplexity.from_state(state["ppl"])
    elif compute_ppl:
        log.warning(
            "%s has no perplexity state; perplexity covers only the chunks from %d", ckpt, reached
        )
    log.info("resuming from %s at chunk %d", ckpt, reached)
    return StartPoint(reached, data.entries, ppl, reached, state.get(CONVERGENCE_STATE_KEY))


__all__ = [
    "CHECKPOINT_SUFFIX",
    "CONVERGENCE_STATE_KEY",
    "KEY_CHECKPOINT_STATE",
    "CorruptCheckpoint",
    "Signature",
    "StaleCheckpoint",
    "StartPoint",
    "checkpoint_digest",
    "checkpoint_due",
    "checkpoint_path",
    "exact_sums",
    "load_checkpoint",
    "signature",
    "start_point",
    "write_checkpoint",
]
