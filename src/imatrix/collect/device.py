"""Activation sums on the GPU, where the activations are: only the result vectors are copied.

Why: with layers offloaded, llama-imatrix copies every observed activation matrix to
the host and sums it there, which makes collection run at a fraction of the GPU's
prompt-processing speed. When an observed input lives in CUDA device memory and CuPy
works, :class:`DeviceSums` wraps the tensor's device pointer as a CuPy array (no copy;
valid during the eval callback, after the scheduler has synchronized the backend) and
runs :mod:`imatrix.collect.device_sums` on it, the same arithmetic the tests run with
NumPy. Everything else is the host path of :mod:`imatrix.collect.accumulate`.

When it is unavailable (CuPy not installed, no working device, a non-CUDA backend) or
switched off, the activations are copied to the host as before, and the log says so
once. ``IMATRIX_DEVICE_SUMS`` chooses: ``auto`` (default: on the device when possible),
``off`` (always copy to the host, e.g. to compare speeds), ``on`` (on the device or
fail: for checks that must measure the device path).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from imatrix import ggml
from imatrix.collect.device_sums import Array, ArrayModule, as_float32, dense_sums, expert_sums
from imatrix.collect.shared_inputs import DenseParts, MoeParts
from imatrix.constants import GGMLQuantizationType
from imatrix.errors import ImatrixError

log = logging.getLogger(__package__)  # the collector's logger

#: environment variable choosing where activations are summed
ENV = "IMATRIX_DEVICE_SUMS"
MODES = {"auto": "auto", "on": "on", "1": "on", "off": "off", "0": "off"}
#: buffer names of ggml's CUDA backend (``CUDA_Host`` is pinned host memory)
_CUDA_BUFFER = re.compile(r"CUDA\d+")
#: activation types a device view can hold, by ggml type (BF16 as its bit patterns)
_FLOATS = {
    int(GGMLQuantizationType.F32): np.float32,
    int(GGMLQuantizationType.F16): np.float16,
    int(GGMLQuantizationType.BF16): np.uint16,
}
_DTYPES = {**_FLOATS, ggml.GGML_TYPE_I32: np.int32}
_HINT = "pip install 'imatrix-pipeline[cuda]', or [cuda13] for CUDA 13"

T = TypeVar("T")


def mode_from_env() -> str:
    raw = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if raw not in MODES:
        raise ImatrixError(f"{ENV}={raw!r}: use auto, on or off")
    return MODES[raw]


@functools.lru_cache(maxsize=1)
def _buffer_lib() -> ctypes.CDLL:
    """libggml-base with the buffer functions we call, checked on a live CPU buffer."""
    lib = ggml.libggml_base()
    P = ctypes.c_void_p
    sigs: dict[str, tuple[list[Any], Any]] = {
        "ggml_backend_buffer_name": ([P], ctypes.c_char_p),
        "ggml_backend_cpu_buffer_type": ([], P),
        "ggml_backend_buft_alloc_buffer": ([P, ctypes.c_size_t], P),
        "ggml_backend_buffer_get_base": ([P], P),
        "ggml_backend_buffer_free": ([P], None),
        "ggml_backend_tensor_alloc": ([P, P, P], ctypes.c_int),
    }
    for fname, (argtypes, restype) in sigs.items():
        f = getattr(lib, fname)
        f.argtypes = argtypes
        f.restype = restype
    _check_buffer_api(lib)
    return lib


def _check_buffer_api(lib: ctypes.CDLL) -> None:
    """Allocate a tensor in a CPU buffer and read back its name, host flag, ``buffer``
    and ``data`` fields: a wrong signature or field offset fails here, not on a GPU."""
    ctx = lib.ggml_init(ggml._InitParams(ggml.check_layout().tensor_size * 4 + 1024, None, True))
    buf = lib.ggml_backend_buft_alloc_buffer(lib.ggml_backend_cpu_buffer_type(), 4096)
    try:
        t = lib.ggml_new_tensor_2d(ctx, ggml.GGML_TYPE_F32, 16, 4)
        base = lib.ggml_backend_buffer_get_base(buf)
        status = lib.ggml_backend_tensor_alloc(buf, t, base)
        view = ggml.tensor(t)
        ok = (
            status == 0
            and lib.ggml_backend_buffer_name(buf) == b"CPU"
            and lib.ggml_backend_buffer_is_host(buf)
            and view.buffer == buf
            and view.data == base
        )
    finally:
        lib.ggml_backend_buffer_free(buf)
        lib.ggml_free(ctx)
    if not ok:
        raise ImatrixError(
            "the ggml library loaded by llama-cpp-python does not match imatrix's view of "
            "backend buffers; install the llama-cpp-python version pinned in pyproject.toml"
        )


def buffer_name(t: ggml.GGMLTensor) -> str | None:
    """The backend buffer type holding ``t`` (``CUDA0``, ...), None for host memory."""
    if not t.buffer or not t.data:
        return None
    lib = _buffer_lib()
    if lib.ggml_backend_buffer_is_host(t.buffer):
        return None
    return bytes(lib.ggml_backend_buffer_name(t.buffer) or b"?").decode(errors="replace")


def load_cupy() -> ArrayModule:
    import cupy  # type: ignore[import-not-found,unused-ignore]  # the optional `cuda` extra

    return cupy


def device_view(xp: ArrayModule, t: ggml.GGMLTensor, device: int) -> Array:
    """``t``'s device memory as an array of shape ``ne[::-1]`` with its byte strides."""
    dtype = np.dtype(_DTYPES[int(t.type)])
    shape = tuple(int(t.ne[i]) for i in range(ggml.GGML_MAX_DIMS - 1, -1, -1))
    strides = tuple(int(t.nb[i]) for i in range(ggml.GGML_MAX_DIMS - 1, -1, -1))
    span = sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) + dtype.itemsize
    mem = xp.cuda.UnownedMemory(int(t.data), span, None, device)
    return xp.ndarray(shape, dtype=dtype, memptr=xp.cuda.MemoryPointer(mem, 0), strides=strides)


class DeviceSums:
    """Sums of device-resident activations on their device, or None: use the host path.

    ``mode``: ``auto``, ``on`` or ``off`` (None: from ``IMATRIX_DEVICE_SUMS``)."""

    def __init__(self, mode: str | None = None) -> None:
        self.mode = mode_from_env() if mode is None else MODES[mode]
        self._xp: ArrayModule | None = None
        #: why the device path is off, once it is (logged once)
        self.off_reason: str | None = None
        self.n_device = 0

    # -- where ------------------------------------------------------------------

    def _disable(self, reason: str, warn: bool = False) -> None:
        if self.mode == "on":
            raise ImatrixError(f"{ENV}=on but activations cannot be summed on the GPU: {reason}")
        self.off_reason = reason
        (log.warning if warn else log.info)(
            "activations in device memory are copied to the host and summed there: %s", reason
        )

    def device_of(self, t: ggml.GGMLTensor) -> int | None:
        """The CUDA device ``t`` lives on when it is summed there, else None."""
        if self.off_reason is not None:
            return None
        name = buffer_name(t)
        if name is None:
            return None
        if self.mode == "off":
            self._disable(f"{ENV}=off")
        elif not _CUDA_BUFFER.fullmatch(name):
            self._disable(f"no device sums for {name} buffers (CUDA only)")
        elif (xp := self._load()) is not None:
            try:
                attrs = xp.cuda.runtime.pointerGetAttributes(int(t.data))
            except Exception as exc:  # a CUDA runtime error
                self._disable(f"CUDA does not know a {name} tensor's memory: {exc}")
                return None
            # device (or managed) memory is addressed on its device at the same address;
            # (CuPy's attribute object has no memory type field in every version)
            if int(attrs.devicePointer) == int(t.data) and int(attrs.device) >= 0:
                return int(attrs.device)
            self._disable(f"{name} tensor memory is not addressable by CUDA kernels")
        return None

    def _load(self) -> ArrayModule | None:
        if self._xp is not None:
            return self._xp
        try:
            xp = load_cupy()
        except ImportError:
            self._disable(f"CuPy is not installed ({_HINT})")
            return None
        try:  # compiles the kernels once, and proves the device works
            x = xp.ones((3, 2), dtype=xp.float32)
            _, sums = expert_sums(xp, x, xp.zeros((3, 1), dtype=xp.int32), 1, 2)
            float((dense_sums(xp, x).sum() + sums.sum()).item())
        except Exception as exc:  # CuPy raises many types (driver, NVRTC, ...)
            self._disable(f"CuPy does not work here: {exc}")
            return None
        log.info(
            "summing activations on the GPU with CuPy %s (%s=off: on the host)", xp.__version__, ENV
        )
        self._xp = xp
        return xp

    def _guarded(self, name: str, device: int, run: Callable[[ArrayModule], T]) -> T | None:
        """``run(xp)`` on ``device``; an unexpected failure switches to the host path."""
        xp = self._xp
        assert xp is not None  # device_of() loaded it
        try:
            with xp.cuda.Device(device):
                result = run(xp)
        except ImatrixError:
            raise
        except Exception as exc:
            self._disable(f"summing '{name}' on GPU {device} failed: {exc}", warn=True)
            return None
        self.n_device += 1
        return result

    # -- what ---------------------------------------------------------------------

    def dense(self, name: str, src1: ggml.GGMLTensor, ne02: int, ne03: int) -> DenseParts | None:
        """(sum of squares, sum) per matrix of a ``MUL_MAT``'s device-resident input."""
        dev = self.device_of(src1)
        if dev is None or int(src1.type) not in _FLOATS:
            return None

        def run(xp: ArrayModule) -> DenseParts:
            x = as_float32(xp, device_view(xp, src1, dev), int(src1.type))
            mats: dict[int, Array] = {}
            for i3 in range(x.shape[0]):
                for i2 in range(x.shape[1]):
                    mat = (i3 % ne03) * ne02 + (i2 % ne02)
                    part = dense_sums(xp, x[i3, i2])
                    mats[mat] = mats[mat] + part if mat in mats else part
            host = xp.asnumpy(xp.stack(list(mats.values())))
            return {m: (host[i, 0], host[i, 1]) for i, m in enumerate(mats)}

        return self._guarded(name, dev, run)

    def moe(
        self, name: str, src1: ggml.GGMLTensor, ids_t: ggml.GGMLTensor, n_as: int
    ) -> MoeParts | None:
        """Experts touched, their sums of squares and sums, and tokens per expert, of a
        ``MUL_MAT_ID``'s device-resident input."""
        dev = self.device_of(src1)
        if dev is None or int(src1.type) not in _FLOATS:
            return None
        ids_dev = self.device_of(ids_t) if int(ids_t.type) == ggml.GGML_TYPE_I32 else None
        host_ids = None if ids_dev == dev else ggml.host_array(ids_t, np.dtype(np.int32))[0, 0]

        def run(xp: ArrayModule) -> MoeParts:
            x = as_float32(xp, device_view(xp, src1, dev), int(src1.type))[0]
            n_tokens, ne11, ne0 = x.shape
            ids = device_view(xp, ids_t, dev)[0, 0] if host_ids is None else xp.asarray(host_ids)
            counts, sums = expert_sums(xp, x.reshape(n_tokens * ne11, ne0), ids, ne11, n_as)
            counts_h = xp.asnumpy(counts)
            if int(counts_h.sum()) != ids.size:
                raise ImatrixError(f"tensor '{name}': expert id out of range 0..{n_as - 1}")
            touched = np.flatnonzero(counts_h)
            part = xp.asnumpy(sums[:, xp.asarray(touched)])
            return touched, part[0], part[1], counts_h

        return self._guarded(name, dev, run)


__all__ = ["ENV", "DeviceSums", "buffer_name", "device_view", "load_cupy", "mode_from_env"]
