"""The ctypes boundary of llama_api: struct copies are checked against the live library."""

from __future__ import annotations

import ctypes

import pytest

from imatrix import llama_api
from imatrix.errors import ImatrixError
from imatrix.ggml import libggml_base


def test_threadpool_params_layout_matches_libggml():
    assert llama_api._cpu_lib() is not None  # the check ran and passed
    llama_api._check_threadpool_params(libggml_base())


class _ShortMask(ctypes.Structure):
    _fields_ = [(n, t) for n, t in llama_api._ThreadpoolParams._fields_ if n != "cpumask"]
    _fields_.insert(0, ("cpumask", ctypes.c_bool * 256))


class _Swapped(ctypes.Structure):
    """n_threads and prio in the wrong order: same size, other offsets."""

    _fields_ = [
        ("cpumask", ctypes.c_bool * 512),
        ("prio", ctypes.c_int),
        ("n_threads", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


@pytest.mark.parametrize("wrong", [_ShortMask, _Swapped], ids=["short-cpumask", "swapped"])
def test_threadpool_params_layout_mismatch_is_refused(monkeypatch, wrong):
    monkeypatch.setattr(llama_api, "_ThreadpoolParams", wrong)
    with pytest.raises(ImatrixError, match="ggml_threadpool_params layout"):
        llama_api._check_threadpool_params(libggml_base())
