"""A ctypes view of ``struct ggml_tensor`` for llama.cpp's eval callback, with a layout guard.

Why a hand-written view: the scheduler's eval callback (``cb_eval``) hands us raw
``ggml_tensor *`` pointers, and llama-cpp-python does not describe that struct. We
read the few fields we need (type, buffer, ne, nb, op, src, data, name) straight from
memory, so a single wrong offset would silently read garbage. :func:`check_layout`
therefore builds real tensors with the loaded ggml (a ``MUL_MAT`` and a
``MUL_MAT_ID`` node in a metadata-only context) and compares every field we use
with what ggml's own accessors report, plus ``ggml_tensor_overhead()`` against our
struct size; on any mismatch it refuses to run with a message naming the field.

The op numbers of ``MUL_MAT`` / ``MUL_MAT_ID`` are not hard-coded either: they are
read from the nodes ggml builds, and confirmed with ``ggml_op_name``.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from imatrix.constants import GGMLQuantizationType
from imatrix.errors import ImatrixError

log = logging.getLogger(__name__)

# Limits from ggml/include/ggml.h of the pinned llama.cpp.
GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
#: sizeof(struct ggml_object), which ggml_tensor_overhead() adds to the tensor struct
GGML_OBJECT_SIZE = 32

GGML_TYPE_F32 = int(GGMLQuantizationType.F32)
GGML_TYPE_F16 = int(GGMLQuantizationType.F16)
GGML_TYPE_I32 = int(GGMLQuantizationType.I32)


class GGMLTensor(ctypes.Structure):
    """``struct ggml_tensor`` (ggml.h), field for field."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


class _InitParams(ctypes.Structure):
    _fields_ = [
        ("mem_size", ctypes.c_size_t),
        ("mem_buffer", ctypes.c_void_p),
        ("no_alloc", ctypes.c_bool),
    ]


def lib_dir() -> Path:
    """The directory of the shared libraries llama-cpp-python loads."""
    import llama_cpp  # the bindings load libllama and its ggml libraries

    return Path(str(llama_cpp.__file__)).resolve().parent / "lib"


def ggml_library(stem: str) -> Path | None:
    """The file of ggml library ``stem`` (``ggml-base``, ``ggml-cpu``) next to
    llama-cpp-python's, under its Linux, macOS or Windows name; None if absent."""
    d = lib_dir()
    for name in (f"lib{stem}.so", f"lib{stem}.dylib", f"{stem}.dll"):
        if (d / name).exists():
            return d / name
    return None


@functools.lru_cache(maxsize=1)
def libggml_base() -> ctypes.CDLL:
    """The ggml-base library llama-cpp-python loaded (same handle: dlopen is refcounted)."""
    import llama_cpp  # noqa: F401  (makes sure libllama, hence ggml-base, is loaded first)

    path = ggml_library("ggml-base")
    if path is None:
        raise ImatrixError(
            f"cannot find the ggml-base library next to llama-cpp-python in {lib_dir()}"
        )
    lib = ctypes.CDLL(str(path))
    P = ctypes.c_void_p
    sigs = {
        "ggml_tensor_overhead": ([], ctypes.c_size_t),
        "ggml_init": ([_InitParams], P),
        "ggml_free": ([P], None),
        "ggml_new_tensor_2d": ([P, ctypes.c_int, ctypes.c_int64, ctypes.c_int64], P),
        "ggml_new_tensor_3d": (
            [P, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64],
            P,
        ),
        "ggml_mul_mat": ([P, P, P], P),
        "ggml_mul_mat_id": ([P, P, P, P], P),
        "ggml_set_name": ([P, ctypes.c_char_p], P),
        "ggml_get_name": ([P], ctypes.c_char_p),
        "ggml_op_name": ([ctypes.c_int], ctypes.c_char_p),
        "ggml_nbytes": ([P], ctypes.c_size_t),
        "ggml_nrows": ([P], ctypes.c_int64),
        "ggml_element_size": ([P], ctypes.c_size_t),
        "ggml_backend_buffer_is_host": ([P], ctypes.c_bool),
        "ggml_backend_tensor_get": ([P, P, ctypes.c_size_t, ctypes.c_size_t], None),
    }
    for fname, (argtypes, restype) in sigs.items():
        f = getattr(lib, fname)
        f.argtypes = argtypes
        f.restype = restype
    return lib


@dataclass(frozen=True)
class Layout:
    """What the guard established about the loaded ggml."""

    op_mul_mat: int
    op_mul_mat_id: int
    tensor_size: int


def _fail(what: str) -> ImatrixError:
    return ImatrixError(
        f"the ggml library loaded by llama-cpp-python does not match imatrix's ggml_tensor "
        f"layout ({what}); install the llama-cpp-python version pinned in pyproject.toml"
    )


@functools.lru_cache(maxsize=1)
def check_layout() -> Layout:
    """Verify our struct against the loaded ggml and return the op numbers we need.

    Raises :class:`ImatrixError` naming the first field that disagrees.
    """
    lib = libggml_base()
    size = ctypes.sizeof(GGMLTensor)
    overhead = int(lib.ggml_tensor_overhead())
    if overhead != size + GGML_OBJECT_SIZE:
        raise _fail(f"ggml_tensor_overhead() = {overhead}, expected {size + GGML_OBJECT_SIZE}")
    ctx = lib.ggml_init(_InitParams(overhead * 16 + 1024, None, True))
    if not ctx:
        raise _fail("ggml_init failed")
    try:
        a = lib.ggml_new_tensor_2d(ctx, GGML_TYPE_F16, 64, 24)
        b = lib.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 64, 20)
        lib.ggml_set_name(a, b"blk.7.guard_a.weight")
        lib.ggml_set_name(b, b"guard_b")
        mm = lib.ggml_mul_mat(ctx, a, b)
        as_ = lib.ggml_new_tensor_3d(ctx, GGML_TYPE_F16, 64, 24, 5)
        b3 = lib.ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 64, 3, 20)
        ids = lib.ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 3, 20)
        mmid = lib.ggml_mul_mat_id(ctx, as_, b3, ids)
        for ptr, nm in ((a, "a"), (b, "b"), (as_, "as"), (b3, "b3"), (ids, "ids")):
            t = GGMLTensor.from_address(ptr)
            if t.name != lib.ggml_get_name(ptr):
                raise _fail(f"name of tensor {nm}")
            if t.data or t.buffer or t.view_src:
                raise _fail(f"data/buffer/view_src of tensor {nm} not NULL")
            elem = int(lib.ggml_element_size(ptr))
            if t.nb[0] != elem:
                raise _fail(f"nb[0] of tensor {nm}: {t.nb[0]} != {elem}")
            nbytes = t.nb[3] * t.ne[3]
            if nbytes != lib.ggml_nbytes(ptr):
                raise _fail(f"ne/nb of tensor {nm}")
            rows = t.ne[1] * t.ne[2] * t.ne[3]
            if rows != lib.ggml_nrows(ptr):
                raise _fail(f"ne of tensor {nm}")
        if GGMLTensor.from_address(a).type != GGML_TYPE_F16:
            raise _fail("type field")
        if GGMLTensor.from_address(b).type != GGML_TYPE_F32:
            raise _fail("type field (F32)")
        if GGMLTensor.from_address(ids).type != GGML_TYPE_I32:
            raise _fail("type field (I32)")
        tm = GGMLTensor.from_address(mm)
        if tm.src[0] != a or tm.src[1] != b:
            raise _fail("src of a MUL_MAT node")
        if list(tm.ne) != [24, 20, 1, 1]:
            raise _fail(f"ne of a MUL_MAT node: {list(tm.ne)}")
        ti = GGMLTensor.from_address(mmid)
        if ti.src[0] != as_ or ti.src[1] != b3 or ti.src[2] != ids:
            raise _fail("src of a MUL_MAT_ID node")
        if lib.ggml_op_name(tm.op) != b"MUL_MAT" or lib.ggml_op_name(ti.op) != b"MUL_MAT_ID":
            raise _fail("op field")
        layout = Layout(op_mul_mat=int(tm.op), op_mul_mat_id=int(ti.op), tensor_size=size)
    finally:
        lib.ggml_free(ctx)
    log.debug("ggml tensor layout verified: %s", layout)
    return layout


def tensor(addr: int) -> GGMLTensor:
    """A view (no copy) of the ggml_tensor at ``addr``."""
    return GGMLTensor.from_address(addr)


def filter_name(raw: bytes) -> str:
    """The weight name inside a scheduler copy's name, as llama-imatrix cuts it.

    ``CUDA0#blk.0.attn_k.weight#0`` -> ``blk.0.attn_k.weight``; a name without '#'
    is returned as is.
    """
    s = raw.decode("utf-8", errors="replace")
    p = s.find("#")
    if p < 0:
        return s
    q = s.find("#", p + 1)
    return s[p + 1 :] if q < 0 else s[p + 1 : q]


_F32 = np.dtype(np.float32)


def host_array(
    t: GGMLTensor, dtype: np.dtype, scratch: dict[int, np.ndarray] | None = None
) -> np.ndarray:
    """The tensor's data as a numpy array of shape ``ne[::-1]`` with its byte strides.

    Host-resident tensors are viewed in place (valid only during the callback); device
    tensors are copied to host with ``ggml_backend_tensor_get`` (their whole byte
    span, as llama-imatrix does), into a reusable buffer from ``scratch``.
    """
    lib = libggml_base()
    shape = tuple(int(t.ne[i]) for i in range(GGML_MAX_DIMS - 1, -1, -1))
    strides = tuple(int(t.nb[i]) for i in range(GGML_MAX_DIMS - 1, -1, -1))
    nbytes = sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) + dtype.itemsize
    addr = ctypes.addressof(t)
    if t.buffer and not lib.ggml_backend_buffer_is_host(t.buffer):
        key = 0 if dtype == _F32 else 1
        buf = None if scratch is None else scratch.get(key)
        if buf is None or buf.nbytes < nbytes:
            buf = np.empty(nbytes, dtype=np.uint8)
            if scratch is not None:
                scratch[key] = buf
        lib.ggml_backend_tensor_get(addr, buf.ctypes.data, 0, nbytes)
        base = buf.ctypes.data
    else:
        if not t.data:
            raise ImatrixError(f"tensor '{t.name.decode(errors='replace')}' has no data")
        base = int(t.data)
    raw = (ctypes.c_char * nbytes).from_address(base)
    # a ctypes array exports the buffer protocol; numpy's stubs do not list it
    return np.ndarray(shape, dtype=dtype, buffer=cast(memoryview, raw), strides=strides)
