"""A thin, general layer over llama-cpp-python's low-level C API.

Why not ``llama_cpp.Llama``: it hides the parameters that decide whether our results
equal llama.cpp's own tools (``n_seq_max``, ``n_ubatch``, the eval callback, which
tokens produce logits, the threadpool) and prints llama.cpp's log output raw on
stderr. This module gives the collector and the evaluation code exactly the calls
llama.cpp's ``common`` library makes, and nothing more:

- :func:`init_backend` — ``llama_backend_init`` once, and llama.cpp's log output
  bridged into Python :mod:`logging` (logger ``imatrix.llama``; llama.cpp's INFO and
  DEBUG messages at DEBUG, its warnings and errors at WARNING and ERROR), so that
  nothing is printed raw.
- :class:`Model` / :func:`load_model` — a model (optionally ``vocab_only``, with
  ``n_gpu_layers``), with its vocabulary facts (BOS, add_bos, n_vocab, ...).
- :class:`Context` — a context made like ``common_init_from_params`` makes it
  (``llama_context_default_params`` plus n_ctx, n_batch, n_ubatch, n_seq_max,
  threads, an optional eval callback, and a persistent CPU threadpool attached as
  llama.cpp's tools do), with :meth:`Context.decode` on a :class:`Batch` and numpy
  views of the logits.
- :func:`tokenize` — ``common_tokenize`` (add_special, parse_special).

Every failure a user can cause (missing file, model that does not load, context that
cannot be made, decode error) raises :class:`~imatrix.errors.ImatrixError`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from imatrix.errors import ImatrixError

log = logging.getLogger(__name__)
llama_log = logging.getLogger("imatrix.llama")

#: ggml_log_level -> logging level (llama.cpp's INFO is chatty: model dumps, buffers)
_LEVELS = {
    0: logging.INFO,  # NONE: raw output
    1: logging.DEBUG,  # DEBUG
    2: logging.DEBUG,  # INFO
    3: logging.WARNING,  # WARN
    4: logging.ERROR,  # ERROR
}
_LOG_CONT = 5
#: ``llama_decode``'s return code for a decode its abort callback ended
_DECODE_ABORTED = 2
#: what llama.cpp logs about a decode that :meth:`Context.abort_decode` ended on
#: purpose (the graph's status, the ubatch's cache entries dropped, the return code)
_ABORT_LINES = (
    "graph_compute: ggml_backend_sched_graph_compute_async failed",
    "process_ubatch: failed to compute graph",
    "decode: removing memory module entries",
    "llama_decode: failed to decode, ret = 2",
)

#: ``bool (*)(struct ggml_tensor * t, bool ask, void * user_data)``
EvalCallback = Callable[[int, bool], bool]


def _llama() -> ModuleType:
    """The llama_cpp bindings, imported on first use: importing them loads the shared
    libraries, which commands such as ``imatrix info`` never need."""
    import llama_cpp

    return llama_cpp


# ---------------------------------------------------------------------------
# logging bridge


class _LogBridge:
    """Reassembles llama.cpp's log fragments into lines and hands them to ``logging``.

    llama.cpp sends pieces (``CONT`` continues the previous message; progress dots
    have no newline), possibly from several threads.
    """

    def __init__(self) -> None:
        self._buf = ""
        self._level = logging.DEBUG
        self._lock = threading.Lock()

    def __call__(self, level: int, text: bytes | None, _user: int | None) -> None:
        try:
            s = (text or b"").decode("utf-8", errors="replace")
            with self._lock:
                if level != _LOG_CONT:
                    if self._buf:
                        self._emit(self._buf)
                        self._buf = ""
                    self._level = _LEVELS.get(level, logging.DEBUG)
                self._buf += s
                while "\n" in self._buf:
                    line, self._buf = self._buf.split("\n", 1)
                    self._emit(line)
        except Exception:  # a logging failure must never unwind into C
            pass

    def _emit(self, line: str) -> None:
        line = line.rstrip()
        if line and llama_log.isEnabledFor(self._level):
            llama_log.log(self._level, "%s", line)


_bridge = _LogBridge()
_bridge_c = None  # the ctypes callback object; must stay referenced
_init_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def init_backend() -> None:
    """Initialise llama.cpp once per process and route its logs into ``logging``."""
    global _bridge_c
    with _init_lock:
        lc = _llama()
        _bridge_c = lc.llama_log_callback(_bridge)
        lc.llama_log_set(_bridge_c, ctypes.c_void_p(0))
        lc.llama_backend_init()


def default_threads() -> int:
    """Physical cores, as llama.cpp's ``common_cpu_get_num_math`` counts them on Linux
    (distinct ``thread_siblings`` sets), else the number of usable CPUs."""
    sib = set()
    cpu = 0
    while True:
        p = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings")
        try:
            sib.add(p.read_text().strip())
        except OSError:
            break
        cpu += 1
    if sib:
        return len(sib)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def gpu_offload_supported() -> bool:
    """Whether this llama.cpp build can offload to a GPU (``llama_supports_gpu_offload``)."""
    init_backend()
    return bool(_llama().llama_supports_gpu_offload())


# ---------------------------------------------------------------------------
# model


@dataclass
class Model:
    """A loaded llama.cpp model (or only its vocabulary)."""

    path: Path
    ptr: int
    vocab_only: bool
    n_gpu_layers: int
    _closed: bool = field(default=False, repr=False)

    @property
    def vocab(self) -> int:
        return int(_llama().llama_model_get_vocab(self.ptr))

    @property
    def n_vocab(self) -> int:
        return int(_llama().llama_vocab_n_tokens(self.vocab))

    @property
    def add_bos(self) -> bool:
        return bool(_llama().llama_vocab_get_add_bos(self.vocab))

    @property
    def add_eos(self) -> bool:
        return bool(_llama().llama_vocab_get_add_eos(self.vocab))

    @property
    def bos(self) -> int:
        return int(_llama().llama_vocab_bos(self.vocab))

    @property
    def vocab_type(self) -> int:
        return int(_llama().llama_vocab_type(self.vocab))

    @property
    def n_layer(self) -> int:
        return int(_llama().llama_model_n_layer(self.ptr))

    @property
    def n_embd(self) -> int:
        return int(_llama().llama_model_n_embd(self.ptr))

    @property
    def n_ctx_train(self) -> int:
        return int(_llama().llama_model_n_ctx_train(self.ptr))

    def meta(self, key: str) -> str | None:
        """A metadata value of the model as text (``llama_model_meta_val_str``)."""
        lc = _llama()
        buf = ctypes.create_string_buffer(4096)
        n = lc.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            lc.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def close(self) -> None:
        if not self._closed and self.ptr:
            _llama().llama_model_free(self.ptr)
            self._closed = True

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_model(
    path: str | os.PathLike[str], *, n_gpu_layers: int = -1, vocab_only: bool = False
) -> Model:
    """Load a GGUF model; ``vocab_only`` loads only the tokenizer (fast, no weights).

    ``n_gpu_layers``: layers to offload (negative: all), as ``-ngl``.
    """
    p = Path(path)
    if not p.is_file():
        raise ImatrixError(f"{p}: no such model file")
    init_backend()
    lc = _llama()
    mp = lc.llama_model_default_params()
    mp.n_gpu_layers = int(n_gpu_layers)
    mp.vocab_only = bool(vocab_only)
    with llama_errors() as errors:
        ptr = lc.llama_model_load_from_file(str(p).encode(), mp)
    if not ptr:
        raise ImatrixError(_load_failure(p, errors))
    return Model(path=p, ptr=ptr, vocab_only=vocab_only, n_gpu_layers=int(n_gpu_layers))


class _TakeLines(logging.Filter):
    """Takes llama.cpp's lines at ``level`` and above out of the log while a call runs:
    they become part of our one-line error message or are parsed (a dry run's tensor
    list); those above DEBUG are passed on at DEBUG when the user asked for DEBUG
    (``-v``) before the capture opened the logger."""

    def __init__(self, level: int, pass_on: bool) -> None:
        super().__init__()
        self.level = level
        self.pass_on = pass_on
        self.lines: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level or getattr(record, _PASSED_ON, False):
            return True
        self.lines.append(record.getMessage())
        if self.pass_on and record.levelno > logging.DEBUG:
            llama_log.debug("%s", record.getMessage(), extra={_PASSED_ON: True})
        return False


#: marks a taken line passed on at DEBUG, so that no capture takes it a second time
_PASSED_ON = "imatrix_llama_passed_on"


@contextlib.contextmanager
def llama_log_lines(level: int = logging.ERROR) -> Iterator[list[str]]:
    """llama.cpp's log lines at ``level`` and above logged while the block runs, kept out
    of the user's log (the one mechanism every caller that reads llama.cpp's log uses).

    Lines below the logger's own level are not even formatted by the bridge, so the
    logger is opened down to ``level`` for the duration; everything at or above it is
    taken, so nothing new reaches the user's handlers."""
    init_backend()
    f = _TakeLines(level, pass_on=llama_log.isEnabledFor(logging.DEBUG))
    old = llama_log.level
    if not llama_log.isEnabledFor(level):
        llama_log.setLevel(level)
    llama_log.addFilter(f)
    try:
        yield f.lines
    finally:
        llama_log.removeFilter(f)
        llama_log.setLevel(old)


def llama_errors() -> contextlib.AbstractContextManager[list[str]]:
    """llama.cpp's error lines logged while the block runs, for a one-line error message."""
    return llama_log_lines(logging.ERROR)


def model_file_problem(path: str | Path) -> str | None:
    """What is wrong with a model file llama.cpp refused, if our strict GGUF reader can
    tell (not a GGUF, truncated, damaged, an imatrix passed as a model); None if the
    file looks like a sound model. Only called after a failure: costs nothing otherwise."""
    from imatrix.constants import GENERAL_TYPE_IMATRIX, KEY_GENERAL_TYPE
    from imatrix.gguf_io import read_gguf

    try:
        g = read_gguf(path, load_data=False)
    except ImatrixError as exc:
        return str(exc)
    if g.get(KEY_GENERAL_TYPE) == GENERAL_TYPE_IMATRIX:
        return f"{path}: is an imatrix GGUF, not a model"
    return None


def _load_failure(path: Path, errors: list[str]) -> str:
    """Why ``path`` did not load, in one line: :func:`model_file_problem`, else
    llama.cpp's own reason (e.g. an unknown architecture)."""
    problem = model_file_problem(path)
    if problem is not None:
        return problem
    reasons = [
        e.split("error loading model:", 1)[1].strip() for e in errors if "error loading model:" in e
    ]
    reason = (reasons or [e for e in errors if e.strip()] or ["see its log (-v)"])[0]
    reason = reason.removeprefix("llama_model_loader: ")
    return f"{path}: llama.cpp cannot load the model: {reason}"


# ---------------------------------------------------------------------------
# tokenization


def tokenize(
    model: Model, text: bytes | str, *, add_special: bool, parse_special: bool
) -> np.ndarray:
    """Token ids (int32) of ``text``, exactly as ``common_tokenize`` returns them."""
    lc = _llama()
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if len(data) > 2**31 - 3:
        raise ImatrixError(f"text of {len(data)} bytes is too large to tokenize in one piece")
    n_max = len(data) + 2 * int(add_special)
    out = np.zeros(max(n_max, 1), dtype=np.int32)
    ptr = out.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
    n = lc.llama_tokenize(model.vocab, data, len(data), ptr, n_max, add_special, parse_special)
    if n == -(2**31):
        raise ImatrixError("tokenization failed: the result exceeds int32 limits")
    if n < 0:
        out = np.zeros(-n, dtype=np.int32)
        ptr = out.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        m = lc.llama_tokenize(model.vocab, data, len(data), ptr, -n, add_special, parse_special)
        if m != -n:
            raise ImatrixError(f"tokenization is not stable ({m} != {-n} tokens)")
        return out
    return out[:n].copy()


# ---------------------------------------------------------------------------
# batches


class Batch:
    """A token batch backed by numpy arrays (one sequence id per token).

    Filled with :meth:`set` in one vectorized step instead of a Python loop per token.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("batch capacity must be positive")
        self.capacity = int(capacity)
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        item = self.seq.itemsize
        self._seq_ptrs = (ctypes.POINTER(ctypes.c_int32) * capacity)(
            *[
                ctypes.cast(self.seq.ctypes.data + i * item, ctypes.POINTER(ctypes.c_int32))
                for i in range(capacity)
            ]
        )
        self.n_tokens = 0

    def set(
        self,
        tokens: np.ndarray,
        pos: np.ndarray,
        seq_id: np.ndarray | int = 0,
        logits: np.ndarray | bool = True,
    ) -> None:
        """Fill the batch: token ids, positions, sequence ids, which tokens output logits."""
        n = int(len(tokens))
        if n > self.capacity:
            raise ValueError(f"{n} tokens do not fit a batch of {self.capacity}")
        self.token[:n] = tokens
        self.pos[:n] = pos
        self.seq[:n] = seq_id
        self.logits[:n] = logits
        self.n_tokens = n

    def struct(self) -> Any:
        """The ``llama_batch`` struct (a llama_cpp ctypes Structure) pointing into our
        arrays."""
        i32 = ctypes.POINTER(ctypes.c_int32)
        return _llama().llama_batch(
            n_tokens=self.n_tokens,
            token=self.token.ctypes.data_as(i32),
            embd=None,
            pos=self.pos.ctypes.data_as(i32),
            n_seq_id=self.n_seq_id.ctypes.data_as(i32),
            seq_id=ctypes.cast(self._seq_ptrs, ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))),
            logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )


# ---------------------------------------------------------------------------
# context


class _ThreadpoolParams(ctypes.Structure):
    """``struct ggml_threadpool_params`` (ggml.h): never returned by value and never
    filled by us; ``ggml_threadpool_params_init`` fills it in place, after
    :func:`_check_threadpool_params` has verified its size and the fields it writes."""

    _fields_ = [
        ("cpumask", ctypes.c_bool * 512),  # GGML_MAX_N_THREADS
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


#: ggml_threadpool_params_init's defaults (ggml.c): normal priority, polling level 50
_TP_DEFAULT_POLL = 50
#: bytes past our struct that the layout check watches for writes
_TP_GUARD = 256


def _check_threadpool_params(base: ctypes.CDLL) -> None:
    """Refuse a ggml whose ``ggml_threadpool_params`` differs from our copy.

    ``ggml_threadpool_params_init`` fills a buffer larger than our struct whose bytes
    are all 0xA5: it must write nothing past our size, and our fields must read the
    values it sets (the thread count we pass and its documented defaults).
    """
    size = ctypes.sizeof(_ThreadpoolParams)
    buf = (ctypes.c_uint8 * (size + _TP_GUARD))(*([0xA5] * (size + _TP_GUARD)))
    base.ggml_threadpool_params_init(buf, 7)
    params = _ThreadpoolParams.from_buffer(buf)
    got = (params.n_threads, params.prio, params.poll, params.strict_cpu, params.paused)
    if bytes(buf[size:]) != b"\xa5" * _TP_GUARD or got != (7, 0, _TP_DEFAULT_POLL, False, False):
        raise ImatrixError(
            "the ggml library loaded by llama-cpp-python does not match imatrix's "
            f"ggml_threadpool_params layout (read {got}); install the llama-cpp-python "
            "version pinned in pyproject.toml"
        )
    if any(params.cpumask):
        raise ImatrixError("ggml_threadpool_params layout: cpumask not cleared by ggml")


@functools.lru_cache(maxsize=1)
def _cpu_lib() -> ctypes.CDLL | None:
    """ggml's CPU backend library (threadpools), its layout checked; None if absent."""
    from imatrix.ggml import ggml_library, libggml_base

    lc = _llama()
    path = ggml_library("ggml-cpu")
    if path is None:  # pragma: no cover - a build without a CPU backend library
        return None
    base = libggml_base()
    base.ggml_threadpool_params_init.argtypes = [ctypes.c_void_p, ctypes.c_int]
    base.ggml_threadpool_params_init.restype = None
    _check_threadpool_params(base)
    lib = ctypes.CDLL(str(path))
    lib.ggml_threadpool_new.argtypes = [ctypes.POINTER(_ThreadpoolParams)]
    lib.ggml_threadpool_new.restype = ctypes.c_void_p
    lib.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
    lib.ggml_threadpool_free.restype = None
    attach = lc.llama_cpp._lib.llama_attach_threadpool
    attach.argtypes = [ctypes.c_void_p] * 3
    attach.restype = None
    return lib


class _AbortLines(logging.Filter):
    """Keeps llama.cpp's lines about a decode we aborted on purpose out of the log."""

    def __init__(self, ctx: Context) -> None:
        super().__init__()
        self.ctx = ctx

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.ctx.aborting:
            return True
        msg = record.getMessage()
        return not any(msg.startswith(p) for p in _ABORT_LINES)


class Context:
    """A llama.cpp context, created the way llama.cpp's tools create theirs.

    ``n_ctx`` is the total KV size (``n_seq_max`` sequences share it), ``n_batch`` the
    most tokens one :meth:`decode` takes, ``n_ubatch`` the physical batch. ``cb_eval``
    (``f(tensor_address, ask) -> bool``) becomes the scheduler's eval callback; an
    exception raised inside it is kept, the computation of the current graph split is
    stopped, and the exception is re-raised from :meth:`decode`.
    """

    def __init__(
        self,
        model: Model,
        *,
        n_ctx: int,
        n_batch: int | None = None,
        n_ubatch: int | None = None,
        n_seq_max: int = 1,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        cb_eval: EvalCallback | None = None,
        embeddings: bool = False,
        n_outputs_max: int | None = None,
    ) -> None:
        init_backend()
        lc = _llama()
        self.model = model
        #: ``llama_context *`` (None once closed)
        self.ptr: int | None = None
        #: ``ggml_threadpool *`` attached to it, if any
        self._tp: int | None = None
        cp = lc.llama_context_default_params()
        cp.n_ctx = int(n_ctx)
        cp.n_batch = int(n_batch if n_batch is not None else min(2048, n_ctx))
        cp.n_ubatch = int(n_ubatch if n_ubatch is not None else 512)
        cp.n_seq_max = int(n_seq_max)
        nt = int(n_threads) if n_threads and n_threads > 0 else default_threads()
        ntb = int(n_threads_batch) if n_threads_batch and n_threads_batch > 0 else nt
        cp.n_threads = nt
        cp.n_threads_batch = ntb
        cp.embeddings = bool(embeddings)
        # llama.cpp's tools (common_params) keep a sliding-window cache the size of the
        # window, where the library default is a full-size one
        cp.swa_full = False
        if n_outputs_max:  # most logits rows per ubatch: bounds the output and compute buffers
            cp.n_outputs_max = int(n_outputs_max)
        self._cb_error: BaseException | None = None
        self._cb_c: Any = None  # the ctypes callback object: must stay referenced
        self._abort_c: Any = None  # the abort callback (see abort_decode)
        self._abort_filter: _AbortLines | None = None
        #: True from :meth:`abort_decode` until the decode it ends returns
        self.aborting = False
        #: decodes ended by :meth:`abort_decode`
        self.n_aborted = 0
        if cb_eval is not None:
            self._cb_c = self._c_callback(cb_eval)
            cp.cb_eval = self._cb_c
            cp.cb_eval_user_data = None
        ptr = lc.llama_init_from_model(model.ptr, cp)
        if not ptr:
            raise ImatrixError(
                f"{model.path}: llama.cpp could not create a context with n_ctx={n_ctx}, "
                f"n_batch={cp.n_batch}, n_ubatch={cp.n_ubatch}, n_seq_max={n_seq_max} "
                "(run with -v for its log)"
            )
        self.ptr = ptr
        self.n_threads = nt
        self._attach_threadpool(nt, ntb)
        self.n_ctx = int(lc.llama_n_ctx(ptr))
        self.n_batch = int(lc.llama_n_batch(ptr))
        self.n_ubatch = int(lc.llama_n_ubatch(ptr))
        self.n_seq_max = int(lc.llama_n_seq_max(ptr))
        self.n_vocab = model.n_vocab

    def _c_callback(self, user_cb: EvalCallback) -> Any:
        """The C eval callback (kept referenced by the context) around ``user_cb``: an
        exception stops the graph and is kept for :meth:`decode` to raise."""

        def _trampoline(t: int, ask: bool, _user: int | None) -> bool:
            if self._cb_error is not None:
                return False
            try:
                return bool(user_cb(t, ask))
            except BaseException as exc:  # stop the graph; re-raised by decode()
                self._cb_error = exc
                return False

        return _llama().ggml_backend_sched_eval_callback(_trampoline)

    def _attach_threadpool(self, nt: int, ntb: int) -> None:
        """One persistent threadpool, as ``common_threadpools::init`` attaches it.

        Without it ggml starts threads for every graph piece the eval callback
        splits off (one per observed tensor).
        """
        lib = _cpu_lib()
        if lib is None or nt != ntb:
            return
        from imatrix.ggml import libggml_base

        params = _ThreadpoolParams()
        libggml_base().ggml_threadpool_params_init(ctypes.byref(params), nt)
        tp = lib.ggml_threadpool_new(ctypes.byref(params))
        if not tp:
            log.warning("could not create a CPU threadpool of %d threads", nt)
            return
        self._tp = tp
        _llama().llama_cpp._lib.llama_attach_threadpool(self.ptr, tp, None)

    # -- evaluation -----------------------------------------------------------

    def clear(self) -> None:
        """Forget every sequence (``llama_memory_clear`` with data)."""
        lc = _llama()
        lc.llama_memory_clear(lc.llama_get_memory(self.ptr), True)

    def enable_abort(self) -> None:
        """Allow :meth:`abort_decode` (from the eval callback) for this context."""
        lc = _llama()
        if self._abort_c is None:
            self._abort_c = lc.ggml_abort_callback(lambda _data: True)
            self._abort_filter = _AbortLines(self)
            llama_log.addFilter(self._abort_filter)

    @property
    def abort_enabled(self) -> bool:
        """:meth:`enable_abort` was called."""
        return self._abort_c is not None

    def abort_decode(self) -> None:
        """End the running decode after the next node the CPU backend computes, so that
        llama.cpp skips the rest of the graph and copies out no logits. Called from the
        eval callback between graph pieces; the aborted ubatch's cache entries are
        dropped and the decode's later ubatches are not run (see
        :meth:`imatrix.collect.plan.ChunkPlan.abort_split`)."""
        if self._abort_c is None:
            raise RuntimeError("abort_decode without enable_abort")
        _llama().llama_set_abort_callback(self.ptr, self._abort_c, None)
        self.aborting = True

    def decode(self, batch: Batch) -> None:
        """``llama_decode`` the batch; errors (and eval-callback exceptions) are raised.
        A decode ended by :meth:`abort_decode` returns normally."""
        if batch.n_tokens <= 0:
            raise ValueError("empty batch")
        self._cb_error = None
        lc = _llama()
        try:
            ret = lc.llama_decode(self.ptr, batch.struct())
        finally:
            if self.aborting:
                lc.llama_set_abort_callback(self.ptr, lc.ggml_abort_callback(), None)
        aborted, self.aborting = self.aborting, False
        if self._cb_error is not None:
            exc, self._cb_error = self._cb_error, None
            raise exc
        if ret == _DECODE_ABORTED and aborted:
            self.n_aborted += 1
            return
        if ret != 0:
            raise ImatrixError(
                f"llama_decode failed (code {ret}) on a batch of {batch.n_tokens} tokens"
            )

    def decode_tokens(
        self,
        batch: Batch,
        tokens: np.ndarray,
        pos: np.ndarray,
        seq_id: np.ndarray | int = 0,
        logits: np.ndarray | bool = True,
    ) -> None:
        """Fill ``batch`` and decode it in one call."""
        batch.set(tokens, pos, seq_id, logits)
        self.decode(batch)

    def logits(self, n_rows: int) -> np.ndarray:
        """The last decode's logits, ``[n_rows, n_vocab]`` float32, rows in batch order of
        the tokens that asked for output (a view: copy before the next decode)."""
        p = _llama().llama_get_logits(self.ptr)
        if not p:
            raise ImatrixError("no logits available")
        addr = ctypes.cast(p, ctypes.c_void_p).value
        assert addr is not None
        raw = (ctypes.c_float * (n_rows * self.n_vocab)).from_address(addr)
        view: np.ndarray = np.ctypeslib.as_array(raw)
        return view.reshape(n_rows, self.n_vocab)

    def synchronize(self) -> None:
        _llama().llama_synchronize(self.ptr)

    def close(self) -> None:
        lc = _llama()
        if self._abort_filter is not None:
            llama_log.removeFilter(self._abort_filter)
            self._abort_filter = None
        if self.ptr:
            lc.llama_free(self.ptr)
            self.ptr = None
        if self._tp:
            lib = _cpu_lib()
            if lib is not None:
                lib.ggml_threadpool_free(self._tp)
            self._tp = None

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
