"""A stand-in for CuPy, backed by NumPy and host memory, for tests without a GPU.

It implements the few CuPy names :mod:`imatrix.collect.device` calls beyond the NumPy
API (``cuda.UnownedMemory``, ``cuda.MemoryPointer``, ``ndarray(..., memptr=,
strides=)``, ``cuda.Device``, ``cuda.runtime.pointerGetAttributes``, ``asnumpy``) on
host pointers, so the device path, from the tensor's pointer and strides to the vectors
copied back, runs on this machine; every other attribute is NumPy's.
"""

from __future__ import annotations

import contextlib
import ctypes
from types import SimpleNamespace
from typing import Any

import numpy as np


class _Runtime:
    def __init__(self, fake: FakeCupy) -> None:
        self.fake = fake

    def pointerGetAttributes(self, ptr: int) -> SimpleNamespace:
        self.fake.pointers.append(ptr)
        return SimpleNamespace(device=self.fake.device_id, devicePointer=ptr, hostPointer=0)


class _Cuda:
    def __init__(self, fake: FakeCupy) -> None:
        self.fake = fake
        self.runtime = _Runtime(fake)

    @staticmethod
    def UnownedMemory(ptr: int, size: int, owner: object, device_id: int) -> tuple[int, int]:
        return ptr, size

    @staticmethod
    def MemoryPointer(mem: tuple[int, int], offset: int) -> tuple[int, int]:
        return mem[0] + offset, mem[1] - offset

    def Device(self, device_id: int) -> contextlib.AbstractContextManager[None]:
        self.fake.devices_used.add(device_id)
        return contextlib.nullcontext()


class FakeCupy:
    """``load_cupy()``'s result in tests: NumPy, plus CuPy's pointer wrapping."""

    __version__ = "fake"

    def __init__(self, device_id: int = 0) -> None:
        self.device_id = device_id
        self.devices_used: set[int] = set()
        self.pointers: list[int] = []
        self.cuda = _Cuda(self)

    @staticmethod
    def ndarray(
        shape: tuple[int, ...], dtype: Any, memptr: tuple[int, int], strides: tuple[int, ...]
    ) -> np.ndarray:
        ptr, size = memptr
        raw = (ctypes.c_char * size).from_address(ptr)
        return np.ndarray(shape, dtype=dtype, buffer=memoryview(raw), strides=strides)

    @staticmethod
    def asnumpy(a: np.ndarray) -> np.ndarray:
        return np.array(a, copy=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)
