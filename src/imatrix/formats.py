"""Reading and writing imatrix files: GGUF (llama-imatrix's and our extended layout) and
legacy ``.dat``, byte for byte as llama.cpp writes them.

Why here and not in :mod:`imatrix.model`: the arithmetic llama.cpp does while loading
and saving (legacy values scaled by the chunk size, divided by counts and multiplied
by ncall, in float32) is a property of the files, and must happen exactly once, at the
boundary, for our bytes to equal llama-imatrix's.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imatrix import __version__
from imatrix.atomic import atomic_write
from imatrix.atomic import remove_stale_temporaries as remove_stale_temporaries  # likewise
from imatrix.constants import (
    DEFAULT_CHUNK_SIZE,
    GENERAL_TYPE_IMATRIX,
    KEY_CHUNK_COUNT,
    KEY_CHUNK_REACHED,
    KEY_CHUNK_SIZE,
    KEY_CONVERGENCE,
    KEY_DATASET_SELECTION,
    KEY_DATASET_SHA256,
    KEY_DATASETS,
    KEY_GENERAL_ARCHITECTURE,
    KEY_GENERAL_TYPE,
    KEY_MODEL_SHA256,
    KEY_TOKENIZER,
    KEY_VERSION,
    SUFFIX_COUNTS,
    SUFFIX_IN_SUM,
    SUFFIX_IN_SUM2,
    GGUFValueType,
)
from imatrix.errors import ImatrixError
from imatrix.gguf_io import GGML_TYPE_F32, GGUFFile, GGUFWriter, read_gguf
from imatrix.model import Entry, ImatrixData, Provenance

log = logging.getLogger(__name__)

FORMAT_GGUF = "gguf"
FORMAT_DAT = "dat"
FORMATS = (FORMAT_GGUF, FORMAT_DAT)

#: A legacy tensor name longer than this is taken as a corrupt header.
_MAX_NAME = 1 << 16


# ---------------------------------------------------------------------------
# detection and reading


def detect_format(path: str | os.PathLike[str]) -> str:
    """``gguf`` or ``dat``, from the file's first bytes (never from its name)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except FileNotFoundError as exc:
        raise ImatrixError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise ImatrixError(f"{path}: is a directory, not a file") from exc
    except OSError as exc:
        raise ImatrixError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if not head:
        raise ImatrixError(f"{path}: file is empty")
    return FORMAT_GGUF if head == b"GGUF" else FORMAT_DAT


def read_imatrix(
    path: str | os.PathLike[str], *, chunk_size: int | None = None, strict: bool = True
) -> ImatrixData:
    """Read an imatrix file of either format.

    ``chunk_size`` is needed only by legacy files (their values are per-chunk means;
    llama.cpp multiplies them back by its ``-c``, default 512). With ``strict`` (the
    default) non-finite or negative values are refused; the health check reads with
    ``strict=False`` to report them instead.
    """
    fmt = detect_format(path)
    if fmt == FORMAT_GGUF:
        data = _from_gguf(read_gguf(path), strict=strict)
    else:
        data = _read_dat(path, chunk_size or DEFAULT_CHUNK_SIZE)
    if strict:
        _check_values(data, str(path))
    return data


def _check_values(data: ImatrixData, src: str) -> None:
    for name, e in data.entries.items():
        if not np.all(np.isfinite(e.values)):
            raise ImatrixError(f"{src}: tensor '{name}' has non-finite sums (NaN or Inf)")
        if np.any(e.values < 0):
            raise ImatrixError(f"{src}: tensor '{name}' has negative sums of squares")
        if not np.all(np.isfinite(e.counts)) or np.any(e.counts < 0):
            raise ImatrixError(f"{src}: tensor '{name}' has invalid counts")
        if e.sums is not None and not np.all(np.isfinite(e.sums)):
            raise ImatrixError(f"{src}: tensor '{name}' has non-finite activation sums")


def _kv_str(g: GGUFFile, key: str) -> str | None:
    kv = g.kv.get(key)
    if kv is None:
        return None
    if kv.type != GGUFValueType.STRING:
        raise ImatrixError(f"{g.path}: key '{key}' should be a string")
    return str(kv.value)


def _kv_u32(g: GGUFFile, key: str) -> int | None:
    kv = g.kv.get(key)
    if kv is None:
        return None
    if kv.type not in (GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64):
        raise ImatrixError(f"{g.path}: key '{key}' should be an unsigned integer")
    return int(kv.value)


def _kv_strings(g: GGUFFile, key: str) -> list[str]:
    kv = g.kv.get(key)
    if kv is None:
        return []
    if kv.type != GGUFValueType.ARRAY or kv.elem_type != GGUFValueType.STRING:
        raise ImatrixError(f"{g.path}: key '{key}' should be an array of strings")
    return list(kv.value)


def _from_gguf(g: GGUFFile, *, strict: bool) -> ImatrixData:
    gtype = g.get(KEY_GENERAL_TYPE)
    if gtype is not None and gtype != GENERAL_TYPE_IMATRIX:
        raise ImatrixError(f"{g.path}: is a GGUF of type '{gtype}', not an imatrix")
    groups: dict[str, dict[str, np.ndarray]] = {}
    for t in g.tensors:
        for suffix in (SUFFIX_IN_SUM2, SUFFIX_COUNTS, SUFFIX_IN_SUM):
            if t.name.endswith(suffix):
                if t.type != GGML_TYPE_F32:
                    raise ImatrixError(f"{g.path}: tensor '{t.name}' must be F32")
                assert t.data is not None
                groups.setdefault(t.name[: -len(suffix)], {})[suffix] = t.data
                break
    if not any(SUFFIX_IN_SUM2 in grp for grp in groups.values()):
        if g.get(KEY_GENERAL_ARCHITECTURE) is not None or g.tensors:
            raise ImatrixError(
                f"{g.path}: is a model GGUF (no '*.in_sum2' tensors), not an imatrix"
            )
        raise ImatrixError(f"{g.path}: no data in imatrix file")
    entries: dict[str, Entry] = {}
    for name in sorted(groups):
        grp = groups[name]
        if SUFFIX_IN_SUM2 not in grp or SUFFIX_COUNTS not in grp:
            raise ImatrixError(f"{g.path}: mismatched sums and counts for '{name}'")
        e = Entry(grp[SUFFIX_IN_SUM2], grp[SUFFIX_COUNTS], grp.get(SUFFIX_IN_SUM))
        try:
            e.check(name)
        except ImatrixError as exc:
            raise ImatrixError(f"{g.path}: {exc}") from None
        entries[name] = e
    chunk_size = _kv_u32(g, KEY_CHUNK_SIZE) or 0
    chunk_count = _kv_u32(g, KEY_CHUNK_COUNT) or 0
    sha = _kv_str(g, KEY_MODEL_SHA256)
    reached = _kv_u32(g, KEY_CHUNK_REACHED)
    prov = Provenance(
        model_sha256=sha,
        dataset_sha256=_kv_strings(g, KEY_DATASET_SHA256),
        tokenizer=_kv_str(g, KEY_TOKENIZER),
        version=_kv_str(g, KEY_VERSION),
        chunk_reached=reached,
        convergence=_kv_str(g, KEY_CONVERGENCE),
        dataset_selection=_kv_strings(g, KEY_DATASET_SELECTION),
    )
    data = ImatrixData(
        entries=entries,
        datasets=_kv_strings(g, KEY_DATASETS),
        chunk_count=chunk_count,
        chunk_size=chunk_size or DEFAULT_CHUNK_SIZE,
        provenance=prov,
    )
    data.has_metadata = all(k in g.kv for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE))
    return data


@dataclass
class _DatEntry:
    name: str
    ncall: int
    values: np.ndarray  # float32, as stored


@dataclass
class _DatFile:
    entries: list[_DatEntry]
    chunk_count: int
    dataset: str | None


class _DatReader:
    """Bounds-checked little-endian reads of a legacy file; an overrun names the file."""

    def __init__(self, raw: bytes, path: str) -> None:
        self.raw = raw
        self.path = path
        self.pos = 0

    def left(self) -> int:
        return len(self.raw) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.left():
            raise ImatrixError(
                f"{self.path}: truncated or corrupt .dat imatrix: {what} at byte {self.pos} "
                f"needs {n} bytes, {self.left()} left"
            )
        out = self.raw[self.pos : self.pos + n]
        self.pos += n
        return out

    def i32(self, what: str) -> int:
        value: int = struct.unpack("<i", self.take(4, what))[0]
        return value

    def corrupt(self, what: str) -> ImatrixError:
        return ImatrixError(f"{self.path}: corrupt .dat imatrix: {what}")


def _parse_dat(path: str | os.PathLike[str]) -> _DatFile:
    p = os.fspath(path)
    try:
        rd = _DatReader(Path(p).read_bytes(), p)
    except FileNotFoundError as exc:
        raise ImatrixError(f"{p}: no such file") from exc
    except OSError as exc:
        raise ImatrixError(f"{p}: cannot read: {exc.strerror or exc}") from exc
    n_entries = rd.i32("entry count")
    if n_entries < 1:
        raise ImatrixError(f"{p}: not an imatrix (.dat header says {n_entries} entries)")
    # each entry needs at least 16 bytes: reject a lying header before looping
    if n_entries * 16 > len(rd.raw):
        raise rd.corrupt(f"header claims {n_entries} entries in {len(rd.raw)} bytes")
    entries: list[_DatEntry] = []
    seen: set[str] = set()
    for i in range(n_entries):
        entries.append(_dat_entry(rd, i + 1, seen))
    chunk_count = 0
    dataset: str | None = None
    if rd.left() > 0:
        chunk_count = rd.i32("chunk count")
        ln = rd.i32("dataset name length")
        if ln < 0:
            raise rd.corrupt(f"dataset name length {ln}")
        if ln > 0:
            dataset = rd.take(ln, "dataset name").decode("utf-8", errors="replace")
        if rd.left() != 0:
            raise rd.corrupt(f"{rd.left()} unexpected trailing bytes")
    return _DatFile(entries, chunk_count, dataset)


def _dat_entry(rd: _DatReader, k: int, seen: set[str]) -> _DatEntry:
    """Entry number ``k`` (1-based): name, ncall, values; ``seen`` refuses duplicates."""
    n = rd.i32(f"name length of entry {k}")
    if not 0 < n <= _MAX_NAME:
        raise rd.corrupt(f"entry {k} has name length {n}")
    try:
        name = rd.take(n, f"name of entry {k}").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise rd.corrupt(f"entry {k} name is not UTF-8") from exc
    if "\0" in name:
        raise rd.corrupt(f"entry {k} name has a NUL byte")
    if name in seen:
        raise rd.corrupt(f"duplicate entry '{name}'")
    seen.add(name)
    ncall = rd.i32(f"ncall of '{name}'")
    nval = rd.i32(f"value count of '{name}'")
    if nval < 1:
        raise rd.corrupt(f"'{name}' has {nval} values")
    vals = np.frombuffer(rd.take(4 * nval, f"values of '{name}'"), dtype="<f4").copy()
    return _DatEntry(name, ncall, vals)


def _read_dat(path: str | os.PathLike[str], chunk_size: int) -> ImatrixData:
    if chunk_size <= 0:
        raise ImatrixError(f"chunk size must be positive, got {chunk_size}")
    dat = _parse_dat(path)
    cs = np.float32(chunk_size)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow -> inf, refused by strict
        return _dat_to_data(dat, cs, chunk_size)


def _dat_to_data(dat: _DatFile, cs: np.float32, chunk_size: int) -> ImatrixData:
    entries = {
        e.name: Entry(
            (e.values * cs).astype(np.float32),  # llama.cpp: sums[j] * chunk_size in float
            np.array([float(e.ncall) * chunk_size]),
        )
        for e in dat.entries
    }
    return ImatrixData(
        entries=dict(sorted(entries.items())),
        datasets=[dat.dataset] if dat.dataset else [],
        chunk_count=dat.chunk_count,
        chunk_size=chunk_size,
        is_legacy=True,
    )


def load_means(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], list[str], int]:
    """What llama-quantize's ``load_imatrix`` computes from a file: per-tensor means,
    the datasets and the chunk count.

    GGUF: ``sum / count`` per expert in float32 (1.0 where the count is 0), and the file
    must have its metadata keys. Legacy: the stored ``mean * ncall`` divided by ncall.
    """
    if detect_format(path) == FORMAT_DAT:
        dat = _parse_dat(path)
        means: dict[str, np.ndarray] = {}
        for e in dat.entries:
            with np.errstate(over="ignore", invalid="ignore"):
                m = (e.values / np.float32(e.ncall)).astype(np.float32) if e.ncall > 0 else e.values
            means[e.name] = m
        return means, [dat.dataset] if dat.dataset else [], dat.chunk_count
    data = read_imatrix(path)
    if not data.has_metadata:
        raise ImatrixError(f"{path}: missing imatrix metadata (datasets, chunk count, chunk size)")
    return data.means(), data.datasets, data.chunk_count


# ---------------------------------------------------------------------------
# writing


def to_gguf_bytes(
    data: ImatrixData, *, compat: bool = False, extra: Mapping[str, str] | None = None
) -> bytes:
    """The bytes llama-imatrix's ``save_imatrix`` would write for this data.

    Without ``compat`` we add ``<name>.in_sum`` tensors (when every entry has them) and
    our ``imatrix_pipeline.*`` provenance keys, which llama.cpp ignores; ``extra``
    string keys (e.g. a collector checkpoint's state) are added after them.
    """
    w = GGUFWriter()
    w.add_string(KEY_GENERAL_TYPE, GENERAL_TYPE_IMATRIX)
    w.add_string_array(KEY_DATASETS, data.datasets)
    w.add_uint32(KEY_CHUNK_COUNT, data.chunk_count)
    w.add_uint32(KEY_CHUNK_SIZE, data.chunk_size)
    with_sums = not compat and data.has_sums
    if not compat:
        prov = data.provenance
        w.add_string(KEY_VERSION, __version__)
        if prov.model_sha256:
            w.add_string(KEY_MODEL_SHA256, prov.model_sha256)
        if prov.dataset_sha256:
            w.add_string_array(KEY_DATASET_SHA256, prov.dataset_sha256)
        if prov.tokenizer:
            w.add_string(KEY_TOKENIZER, prov.tokenizer)
        if prov.chunk_reached is not None:
            w.add_uint32(KEY_CHUNK_REACHED, prov.chunk_reached)
        if prov.convergence:
            w.add_string(KEY_CONVERGENCE, prov.convergence)
        if any(prov.dataset_selection):
            w.add_string_array(KEY_DATASET_SELECTION, prov.dataset_selection)
        for key, value in (extra or {}).items():
            w.add_string(key, value)
    _warn_partial(data)
    for name in sorted(data.entries, key=lambda s: s.encode("utf-8")):
        e = data.entries[name]
        nmat = e.n_counts
        nval = e.values.size
        if nval == 0 or nmat == 0:
            continue
        w.add_f32_tensor(name + SUFFIX_IN_SUM2, e.values, (nval // nmat, nmat))
        w.add_f32_tensor(name + SUFFIX_COUNTS, e.counts, (1, nmat))
        if with_sums:
            assert e.sums is not None
            w.add_f32_tensor(name + SUFFIX_IN_SUM, e.sums, (nval // nmat, nmat))
    return w.to_bytes()


def _warn_partial(data: ImatrixData) -> None:
    for name, e in sorted(data.entries.items()):
        zeros = int(np.count_nonzero(e.counts == 0))
        if zeros > 0:
            pct = 100.0 * (e.n_counts - zeros) / e.n_counts
            log.warning("entry '%s' has partial data (%.2f%%)", name, pct)


def to_dat_bytes(data: ImatrixData, *, dataset: str | None = None) -> bytes:
    """The bytes llama-imatrix's ``save_imatrix_legacy`` would write for this data.

    Entries whose counts are all zero are dropped (with a warning), values are stored
    as ``sum / count * ncall`` in float32 with ``ncall = ceil(max count / chunk size)``,
    a zero-count expert stores 1.0; then the chunk count and the dataset name (the
    last dataset unless ``dataset`` is given).
    """
    cs = data.chunk_size
    if cs <= 0:
        raise ImatrixError(f"chunk size must be positive, got {cs}")
    out: list[bytes] = []
    stored = []
    for name in sorted(data.entries, key=lambda s: s.encode("utf-8")):
        e = data.entries[name]
        if e.n_counts == 0:
            continue
        if not np.any(e.counts != 0):
            log.warning("entry '%s' has no data - skipping", name)
            continue
        stored.append(name)
    if len(stored) < len(data.entries):
        log.warning("storing only %d out of %d entries", len(stored), len(data.entries))
    out.append(struct.pack("<i", len(stored)))
    for name in stored:
        e = data.entries[name]
        counts_i = np.round(e.counts).astype(np.int64)
        ncall = int((int(counts_i.max()) + cs - 1) // cs)
        raw = name.encode("utf-8")
        out.append(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, e.values.size))
        counts = np.repeat(counts_i.astype(np.float32), e.row_size)
        vals = e.values.astype(np.float32)
        zero = counts == 0
        vals = np.where(zero, np.float32(1.0), vals)
        counts = np.where(zero, np.float32(1.0), counts)
        tmp = (vals / counts).astype(np.float32) * np.float32(ncall)
        out.append(tmp.astype("<f4").tobytes())
    out.append(struct.pack("<i", data.chunk_count))
    ds = dataset if dataset is not None else (data.datasets[-1] if data.datasets else "")
    raw_ds = ds.encode("utf-8")
    out.append(struct.pack("<i", len(raw_ds)) + raw_ds)
    return b"".join(out)


def write_imatrix(
    data: ImatrixData,
    path: str | Path,
    *,
    output_format: str = FORMAT_GGUF,
    compat: bool = False,
) -> None:
    """Write ``data`` atomically in the chosen format."""
    if output_format == FORMAT_GGUF:
        payload = to_gguf_bytes(data, compat=compat)
    elif output_format == FORMAT_DAT:
        payload = to_dat_bytes(data)
    else:
        raise ImatrixError(f"unknown output format '{output_format}' (use gguf or dat)")
    atomic_write(path, payload)
    log.info("stored %d entries after %d chunks in %s", len(data.entries), data.chunk_count, path)


def describe(data: ImatrixData, path: str) -> dict[str, Any]:
    """A JSON-ready summary for ``imatrix info``."""
    counts = [e.n_counts for e in data.entries.values()]
    moe = [n for n, e in data.entries.items() if e.n_counts > 1]
    dead = {
        n: int(np.count_nonzero(e.counts == 0))
        for n, e in data.entries.items()
        if np.any(e.counts == 0)
    }
    tok = data.provenance.tokenizer
    return {
        "file": path,
        "format": FORMAT_DAT if data.is_legacy else FORMAT_GGUF,
        "datasets": data.datasets,
        "chunk_count": data.chunk_count,
        "chunk_size": data.chunk_size,
        "tensors": len(data.entries),
        "moe_tensors": len(moe),
        "experts": max(counts, default=0),
        "entries_with_unused_experts": dead,
        "has_activation_sums": data.has_sums,
        "provenance": {
            "model_sha256": data.provenance.model_sha256,
            "dataset_sha256": data.provenance.dataset_sha256,
            "tokenizer": json.loads(tok) if tok else None,
            "version": data.provenance.version,
            "chunk_reached": data.provenance.chunk_reached,
            "dataset_selection": [json.loads(s) if s else None for s in data.selections()],
        },
    }
