"""The ctypes boundary of llama_api: struct copies are checked against the live library."""

from __future__ import annotations

import ctypes
import logging

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


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.levelno, record.getMessage()))


@pytest.mark.parametrize("user_level", [logging.INFO, logging.DEBUG])
def test_llama_log_lines_takes_lines_at_its_level(user_level: int) -> None:
    """llama_errors takes the error lines; a DEBUG capture inside it takes every other
    line; nothing reaches the user's handlers, except the taken lines passed on at DEBUG
    when the user asked for DEBUG; the logger's level is restored."""
    log = llama_api.llama_log
    handler = _Collect()
    old_level, old_prop = log.level, log.propagate
    log.setLevel(user_level)
    log.propagate = False
    log.addHandler(handler)
    try:
        with llama_api.llama_errors() as errors, llama_api.llama_log_lines(logging.DEBUG) as lines:
            log.debug("tensor line")
            log.warning("falling back")
            log.error("failed to quantize: x")
        assert errors == ["failed to quantize: x"]
        assert lines == ["tensor line", "falling back"]
        assert log.level == user_level
        passed = [(logging.DEBUG, "falling back"), (logging.DEBUG, "failed to quantize: x")]
        assert sorted(handler.seen) == (sorted(passed) if user_level == logging.DEBUG else [])
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        log.propagate = old_prop
