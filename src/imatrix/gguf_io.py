"""A small, strict GGUF (v2/v3) reader and a byte-exact writer.

Why our own instead of gguf-py's ``GGUFReader``/``GGUFWriter`` (whose constants we do
use, through :mod:`imatrix.constants`): we need (1) every malformed or truncated input
to raise :class:`~imatrix.errors.ImatrixError` naming the file and what is wrong
(gguf-py raises assorted ``ValueError``/``IndexError``/numpy errors, or memory-maps a
truncated file and fails later), and (2) output whose bytes equal ggml's
``gguf_write_to_file`` exactly, which llama-imatrix writes: header, KV pairs in
insertion order, tensor infos with ``ggml_n_dims`` dimensions (gguf-py writes every
dimension it was given), data padded to the alignment after every tensor.
gguf-py is still used to build test models.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imatrix.constants import (
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGUF_VERSION,
    KEY_GENERAL_ALIGNMENT,
    GGMLQuantizationType,
    GGUFValueType,
    ggml_nbytes,
)
from imatrix.errors import ImatrixError

_SCALAR_FMT: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}

#: the only tensor type an imatrix file holds
GGML_TYPE_F32 = int(GGMLQuantizationType.F32)

_MAX_DIMS = 4


@dataclass
class KV:
    """One metadata pair: its type (and element type for arrays) and its Python value."""

    type: GGUFValueType
    value: Any
    elem_type: GGUFValueType | None = None


@dataclass
class TensorInfo:
    """A tensor's header entry and, for F32 tensors when loaded, its data (ggml order)."""

    name: str
    ne: tuple[int, ...]
    type: int
    offset: int
    data: np.ndarray | None = None

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.ne:
            n *= d
        return n


@dataclass
class GGUFFile:
    """The parsed content of a GGUF file."""

    path: str
    version: int
    kv: dict[str, KV] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)
    alignment: int = GGUF_DEFAULT_ALIGNMENT

    def get(self, key: str, default: Any = None) -> Any:
        kv = self.kv.get(key)
        return default if kv is None else kv.value


class _Cursor:
    """Bounds-checked little-endian reads over a buffer; every overrun is an ImatrixError."""

    def __init__(self, buf: memoryview | bytes, path: str) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise ImatrixError(
                f"{self.path}: truncated or corrupt GGUF: {what} at byte {self.pos} "
                f"needs {n} bytes, file has {len(self.buf) - self.pos} left"
            )

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (val,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return val

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what + " length")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ImatrixError(f"{self.path}: {what} is not valid UTF-8") from exc


def _read_value(cur: _Cursor, vtype: int, key: str) -> KV:
    try:
        t = GGUFValueType(vtype)
    except ValueError as exc:
        raise ImatrixError(f"{cur.path}: key '{key}' has unknown GGUF type {vtype}") from exc
    if t == GGUFValueType.STRING:
        return KV(t, cur.string(f"value of key '{key}'"))
    if t == GGUFValueType.ARRAY:
        et_raw = cur.unpack("<I", f"array type of key '{key}'")
        try:
            et = GGUFValueType(et_raw)
        except ValueError as exc:
            raise ImatrixError(
                f"{cur.path}: key '{key}' has unknown array element type {et_raw}"
            ) from exc
        n = cur.unpack("<Q", f"array length of key '{key}'")
        if et == GGUFValueType.ARRAY:
            raise ImatrixError(f"{cur.path}: key '{key}' is a nested array (unsupported)")
        if et == GGUFValueType.STRING:
            # every string needs at least its 8-byte length
            cur.need(n * 8, f"array of key '{key}'")
            return KV(t, [cur.string(f"element of key '{key}'") for _ in range(n)], et)
        fmt = _SCALAR_FMT[et]
        size = struct.calcsize(fmt)
        cur.need(n * size, f"array of key '{key}'")
        arr = np.frombuffer(cur.buf, dtype=np.dtype(fmt), count=n, offset=cur.pos).copy()
        cur.pos += n * size
        return KV(t, arr.tolist(), et)
    return KV(t, cur.unpack(_SCALAR_FMT[t], f"value of key '{key}'"))


def read_gguf(path: str | os.PathLike[str], *, load_data: bool = True) -> GGUFFile:
    """Parse a GGUF file; with ``load_data`` the F32 tensors' data is copied out.

    Raises ImatrixError for a missing/unreadable file, a foreign file, or any
    truncation or inconsistency, naming the file.
    """
    p = os.fspath(path)
    try:
        with open(p, "rb") as fh:
            size = Path(p).stat().st_size
            if size == 0:
                raise ImatrixError(f"{p}: file is empty")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _parse(memoryview(mm), p, load_data)
    except FileNotFoundError as exc:
        raise ImatrixError(f"{p}: no such file") from exc
    except IsADirectoryError as exc:
        raise ImatrixError(f"{p}: is a directory, not a file") from exc
    except PermissionError as exc:
        raise ImatrixError(f"{p}: permission denied") from exc
    except OSError as exc:
        raise ImatrixError(f"{p}: cannot read: {exc.strerror or exc}") from exc


def _parse(buf: memoryview, path: str, load_data: bool) -> GGUFFile:
    try:
        return _parse_inner(buf, path, load_data)
    finally:
        buf.release()


def _parse_inner(buf: memoryview, path: str, load_data: bool) -> GGUFFile:
    cur = _Cursor(buf, path)
    cur.need(4, "magic")
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise ImatrixError(f"{path}: not a GGUF file (bad magic)")
    cur.pos = 4
    version = cur.unpack("<I", "version")
    if version not in (2, 3):
        raise ImatrixError(f"{path}: unsupported GGUF version {version}")
    n_tensors = cur.unpack("<q", "tensor count")
    n_kv = cur.unpack("<q", "key count")
    # every KV needs >= 12 bytes and every tensor info >= 24: reject lies early
    if n_tensors < 0 or n_kv < 0 or n_kv * 12 + n_tensors * 24 > len(buf):
        raise ImatrixError(
            f"{path}: corrupt GGUF header ({n_kv} keys, {n_tensors} tensors in {len(buf)} bytes)"
        )
    g = GGUFFile(path=path, version=version)
    for i in range(n_kv):
        key = cur.string(f"key #{i}")
        vtype = cur.unpack("<I", f"type of key '{key}'")
        if key in g.kv:
            raise ImatrixError(f"{path}: duplicate key '{key}'")
        g.kv[key] = _read_value(cur, vtype, key)
    align_kv = g.kv.get(KEY_GENERAL_ALIGNMENT)
    if align_kv is not None:
        a = align_kv.value
        if align_kv.type != GGUFValueType.UINT32 or a <= 0 or (a & (a - 1)) != 0:
            raise ImatrixError(f"{path}: invalid {KEY_GENERAL_ALIGNMENT} {a!r}")
        g.alignment = int(a)
    names: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}")
        if name in names:
            raise ImatrixError(f"{path}: duplicate tensor '{name}'")
        names.add(name)
        n_dims = cur.unpack("<I", f"dimensions of tensor '{name}'")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise ImatrixError(f"{path}: tensor '{name}' has {n_dims} dimensions")
        ne = tuple(cur.unpack("<q", f"shape of tensor '{name}'") for _ in range(n_dims))
        if any(d < 0 for d in ne):
            raise ImatrixError(f"{path}: tensor '{name}' has a negative dimension {ne}")
        ttype = cur.unpack("<I", f"type of tensor '{name}'")
        offset = cur.unpack("<Q", f"offset of tensor '{name}'")
        if offset % g.alignment:
            raise ImatrixError(f"{path}: tensor '{name}' offset {offset} is not aligned")
        g.tensors.append(TensorInfo(name, ne, ttype, offset))
    data_start = cur.pos + (-cur.pos) % g.alignment
    for t in g.tensors:
        nbytes = ggml_nbytes(t.type, t.ne)
        start = data_start + t.offset
        if nbytes is not None and start + nbytes > len(buf):
            raise ImatrixError(
                f"{path}: truncated GGUF: data of tensor '{t.name}' ends at byte "
                f"{start + nbytes}, file has {len(buf)}"
            )
        if load_data and t.type == GGML_TYPE_F32 and nbytes is not None:
            t.data = np.frombuffer(buf, dtype="<f4", count=t.n_elements, offset=start).copy()
    return g


# ---------------------------------------------------------------------------
# writer


def _n_dims(ne: tuple[int, ...]) -> int:
    """ggml_n_dims: index of the last dimension > 1, plus one (at least 1)."""
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


class GGUFWriter:
    """Builds GGUF bytes the way ggml's gguf_write_to_file lays them out."""

    def __init__(self, alignment: int = GGUF_DEFAULT_ALIGNMENT) -> None:
        self.alignment = alignment
        self._kv: list[tuple[str, KV]] = []
        self._tensors: list[tuple[str, tuple[int, ...], np.ndarray]] = []

    def add_string(self, key: str, value: str) -> None:
        self._kv.append((key, KV(GGUFValueType.STRING, value)))

    def add_uint32(self, key: str, value: int) -> None:
        self._kv.append((key, KV(GGUFValueType.UINT32, int(value))))

    def add_string_array(self, key: str, values: list[str]) -> None:
        self._kv.append((key, KV(GGUFValueType.ARRAY, list(values), GGUFValueType.STRING)))

    def add_f32_tensor(self, name: str, data: np.ndarray, ne: tuple[int, ...]) -> None:
        """Add an F32 tensor; ``ne`` is ggml's shape (ne[0] is the contiguous dimension)."""
        arr = np.ascontiguousarray(data, dtype="<f4").reshape(-1)
        n = 1
        for d in ne:
            n *= d
        if arr.size != n:
            raise ValueError(f"tensor {name}: {arr.size} values for shape {ne}")
        self._tensors.append((name, tuple(ne), arr))

    @staticmethod
    def _str(s: str) -> bytes:
        b = s.encode("utf-8")
        return struct.pack("<Q", len(b)) + b

    def _kv_bytes(self, key: str, kv: KV) -> bytes:
        out = [self._str(key)]
        if kv.type == GGUFValueType.ARRAY:
            assert kv.elem_type is not None
            out.append(struct.pack("<IIQ", GGUFValueType.ARRAY, kv.elem_type, len(kv.value)))
            if kv.elem_type == GGUFValueType.STRING:
                out.extend(self._str(v) for v in kv.value)
            else:
                fmt = _SCALAR_FMT[kv.elem_type]
                out.extend(struct.pack(fmt, v) for v in kv.value)
        elif kv.type == GGUFValueType.STRING:
            out.append(struct.pack("<I", kv.type) + self._str(kv.value))
        else:
            out.append(struct.pack("<I", kv.type) + struct.pack(_SCALAR_FMT[kv.type], kv.value))
        return b"".join(out)

    def _pad(self, n: int) -> int:
        return (-n) % self.alignment

    def to_bytes(self) -> bytes:
        parts: list[bytes] = [
            GGUF_MAGIC,
            struct.pack("<Iqq", GGUF_VERSION, len(self._tensors), len(self._kv)),
        ]
        parts.extend(self._kv_bytes(k, v) for k, v in self._kv)
        offset = 0
        for name, ne, arr in self._tensors:
            nd = _n_dims(ne)
            parts.append(self._str(name))
            parts.append(struct.pack("<I", nd) + struct.pack(f"<{nd}q", *ne[:nd]))
            parts.append(struct.pack("<IQ", GGML_TYPE_F32, offset))
            offset += arr.nbytes + self._pad(arr.nbytes)
        size = sum(len(p) for p in parts)
        parts.append(b"\0" * self._pad(size))
        for _, _, arr in self._tensors:
            parts.append(arr.tobytes())
            parts.append(b"\0" * self._pad(arr.nbytes))
        return b"".join(parts)
