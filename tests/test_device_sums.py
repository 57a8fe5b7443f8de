"""Activation sums on the device (imatrix.collect.device, imatrix.collect.device_sums).

There is no GPU here, so the device arithmetic runs with NumPy as the array module,
and the device path of the accumulators runs through :class:`fakecupy.FakeCupy`, which
wraps host pointers the way CuPy wraps device pointers. Both are compared with the
host path (today's accumulation): same counts, sums within 1e-6 relative (squares) or
1e-6 of the column's sum of magnitudes (plain sums), and the stated error bounds
against exact sums. The selection logic is tested for falling back, with one log
line, when CuPy is missing (it is not installed here; the test makes sure of that).
"""

from __future__ import annotations

import logging
import math
import sys

import numpy as np
import pytest
from fakecupy import FakeCupy

from imatrix import ggml
from imatrix.activations import ColumnSums
from imatrix.collect import CollectSettings, collect, device, device_sums
from imatrix.collect.accumulate import Accumulators
from imatrix.collect.device import ENV, DeviceSums
from imatrix.collect.device_sums import as_float32, dense_sums, expert_sums, routing
from imatrix.collect.shared_inputs import SharedInputs
from imatrix.errors import ImatrixError
from imatrix.model import Entry
from imatrix.tokenize import tokenize_file

V = 2.0**-53  # float64 unit roundoff
FALLBACK = "copied to the host and summed there"


def _tensor(arr: np.ndarray | None, gtype: int, ne: list[int], name: bytes) -> ggml.GGMLTensor:
    """A ggml_tensor struct over ``arr``'s memory (its strides as nb), or metadata only."""
    t = ggml.GGMLTensor()
    t.type = gtype
    t.name = name
    t.ne[:] = ne
    if arr is not None:
        nb = list(arr.strides[::-1])
        while len(nb) < 4:
            nb.append(nb[-1] * ne[len(nb) - 1])
        t.nb[:] = nb
        t.data = arr.ctypes.data
    return t


def _weight(ne0: int, ne02: int = 1, ne03: int = 1) -> ggml.GGMLTensor:
    return _tensor(None, ggml.GGML_TYPE_F16, [ne0, 8, ne02, ne03], b"blk.0.w.weight")


def _acc(mode: str) -> Accumulators:
    return Accumulators(None, ColumnSums(1), SharedInputs(False), device=DeviceSums(mode))


def _assert_close(a: Entry, b: Entry, s1: np.ndarray) -> None:
    """Same counts; squares within 1e-6 relative; sums within 1e-6 of sum |x|."""
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-6, atol=0)
    assert a.sums is not None and b.sums is not None
    assert np.all(np.abs(a.sums - b.sums) <= 1e-6 * s1)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeCupy:
    """Every tensor with data counts as living in CUDA0 memory; CuPy is the fake."""
    f = FakeCupy()
    monkeypatch.setattr(device, "load_cupy", lambda: f)
    monkeypatch.setattr(device, "buffer_name", lambda t: "CUDA0" if t.data else None)
    return f


@pytest.fixture
def no_cupy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors 'on the GPU', and no CuPy to import (whatever this machine has)."""
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    monkeypatch.setattr(device, "buffer_name", lambda t: "CUDA0" if t.data else None)


# -- the arithmetic, with NumPy as the array module ------------------------------------


@pytest.fixture(params=["one block", "blocks of 7 rows"])
def blocks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The device arithmetic in one block of rows, and in many (as for a large batch)."""
    if request.param != "one block":
        monkeypatch.setattr(device_sums, "BLOCK_BYTES", 8 * 96 * 7)


def test_row_blocks_cover_the_rows_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_sums, "BLOCK_BYTES", 8 * 10 * 3)
    assert device_sums.row_blocks(8, 10) == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert device_sums.row_blocks(2, 10**6) == [slice(0, 1), slice(1, 2)]


def test_dense_sums_match_the_host_path_and_the_bound(blocks: None) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1001, 96)).astype(np.float32)  # rows not a multiple of 16
    x[:, 5] *= 1e-20  # squares below float32's normal range
    x[:, 6] *= 1e18
    x[::7, 7] = -x[::7, 7] * 50  # cancellation in the plain sums
    got = dense_sums(np, x)
    sq, s = ColumnSums(1).dense(x)
    np.testing.assert_allclose(got[0], sq, rtol=1e-6, atol=0)
    x64 = x.astype(np.float64)
    s1 = np.abs(x64).sum(axis=0)
    assert np.all(np.abs(got[1] - s) <= 1e-6 * s1)
    n = x.shape[0]
    for j in range(x.shape[1]):  # the stated bound, against exactly rounded sums
        s2 = math.fsum(x64[:, j] ** 2)
        assert abs(got[0, j] - s2) <= n * V * s2
        assert abs(got[1, j] - math.fsum(x64[:, j])) <= n * V * s1[j]


@pytest.mark.parametrize(("ne11", "n_ids"), [(1, 3), (3, 3), (2, 3)])
def test_expert_sums_match_a_loop_over_tokens(blocks: None, ne11: int, n_ids: int) -> None:
    """Per expert sums as llama-imatrix forms them (token by token, slot by slot),
    including slots sharing a row (ne11 = 1) and rows wrapping unevenly (2 of 3)."""
    rng = np.random.default_rng(1)
    n_tokens, n_as, cols = 40, 6, 33
    x = (rng.normal(size=(n_tokens * ne11, cols)) * 3).astype(np.float32)
    ids = np.stack([rng.choice(n_as, n_ids, replace=False) for _ in range(n_tokens)])
    counts, got = expert_sums(np, x, ids.astype(np.int32), ne11, n_as)
    x64 = x.astype(np.float64)
    want_counts = np.zeros(n_as, dtype=np.int64)
    rows: list[list[int]] = [[] for _ in range(n_as)]
    for t in range(n_tokens):
        for slot in range(n_ids):
            want_counts[ids[t, slot]] += 1
            rows[ids[t, slot]].append(t * ne11 + slot % ne11)
    np.testing.assert_array_equal(counts, want_counts)
    n = x.shape[0]
    for e in range(n_as):
        for j in range(cols):
            col = x64[rows[e], j]
            s2 = math.fsum(col**2)
            assert abs(got[0, e, j] - s2) <= n * V * s2
            assert abs(got[1, e, j] - math.fsum(col)) <= n * V * math.fsum(abs(col))


def test_routing_drops_out_of_range_ids_from_the_counts() -> None:
    ids = np.array([[0, 5], [1, 2]], dtype=np.int32)
    w, counts = routing(np, ids, 1, 3)
    assert counts.tolist() == [1, 1, 1] and int(counts.sum()) < ids.size
    assert w.shape == (3, 2)


def test_half_and_bfloat16_activations_become_float32() -> None:
    x = np.array([1.5, -2.25, 3.0e-3, 65504.0], dtype=np.float32)
    np.testing.assert_array_equal(as_float32(np, x.astype(np.float16), 1), x.astype(np.float16))
    bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)  # truncation: exact for these
    got = as_float32(np, bf16, 30)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, (bf16.astype(np.uint32) << 16).view(np.float32))
    assert got[0] == 1.5 and got[1] == -2.25
    assert as_float32(np, x, 0) is x


# -- the accumulators' device path, through the fake CuPy ------------------------------


@pytest.mark.parametrize(("ne02", "ne12", "ne13"), [(1, 1, 1), (2, 4, 1), (1, 3, 2)])
def test_dense_device_path_matches_the_host_path(
    fake: FakeCupy, ne02: int, ne12: int, ne13: int
) -> None:
    rng = np.random.default_rng(2)
    rows, ne0 = 37, 48
    big = rng.normal(size=(ne13, ne12, rows, ne0 + 16)).astype(np.float32)
    x = big[..., :ne0]  # strided rows: nb[1] != ne0 * 4
    src1 = _tensor(x, ggml.GGML_TYPE_F32, [ne0, rows, ne12, ne13], b"x")
    src0 = _weight(ne0, ne02, ne13 if ne13 > 1 else 1)
    host, dev = _acc("off"), _acc("auto")
    for _ in range(2):
        assert host.dense("w", src0, src1) == dev.dense("w", src0, src1)
    assert dev.device.n_device == 2 and host.device.n_device == 0
    assert fake.devices_used == {0} and fake.pointers[-1] == x.ctypes.data
    n_mat = ne02 * (ne13 if ne13 > 1 else 1)
    s1 = 2 * np.abs(x.astype(np.float64)).sum(axis=(0, 1, 2))
    _assert_close(dev.entries["w"], host.entries["w"], np.tile(s1, n_mat))


@pytest.mark.parametrize("ids_on_device", [True, False])
@pytest.mark.parametrize("ne11", [1, 2])
def test_moe_device_path_matches_the_host_path(
    fake: FakeCupy, monkeypatch: pytest.MonkeyPatch, ne11: int, ids_on_device: bool
) -> None:
    rng = np.random.default_rng(3)
    n_tokens, ne0, n_as, n_ids = 29, 40, 5, 2
    x = rng.normal(size=(1, n_tokens, ne11, ne0)).astype(np.float32)
    ids = np.stack([rng.choice(n_as, n_ids, replace=False) for _ in range(n_tokens)])
    ids = np.ascontiguousarray(ids.astype(np.int32))
    ids[:, 0] = ids[:, 0] % (n_as - 1)  # expert n_as - 1 rarely or never fires
    src1 = _tensor(x, ggml.GGML_TYPE_F32, [ne0, ne11, n_tokens, 1], b"x")
    ids_t = _tensor(ids, ggml.GGML_TYPE_I32, [n_ids, n_tokens, 1, 1], b"ids")
    src0 = _tensor(None, ggml.GGML_TYPE_F16, [ne0, 8, n_as, 1], b"blk.0.ffn_up_exps.weight")
    if not ids_on_device:
        monkeypatch.setattr(
            device,
            "buffer_name",
            lambda t: "CUDA0" if t.data and t.type != ggml.GGML_TYPE_I32 else None,
        )
    host, dev = _acc("off"), _acc("auto")
    assert host.moe("e", src0, src1, ids_t) == dev.moe("e", src0, src1, ids_t) == n_tokens
    assert dev.device.n_device == 1
    assert (ids.ctypes.data in fake.pointers) is ids_on_device
    s1 = np.abs(x.astype(np.float64)).sum(axis=(0, 1, 2))
    _assert_close(dev.entries["e"], host.entries["e"], np.tile(s1, n_as))


def test_device_path_refuses_what_the_host_path_refuses(fake: FakeCupy) -> None:
    x = np.ones((1, 20, 1, 16), dtype=np.float32)
    ids = np.array([[0, 7]] * 20, dtype=np.int32)
    src1 = _tensor(x, ggml.GGML_TYPE_F32, [16, 1, 20, 1], b"x")
    ids_t = _tensor(ids, ggml.GGML_TYPE_I32, [2, 20, 1, 1], b"ids")
    src0 = _tensor(None, ggml.GGML_TYPE_F16, [16, 8, 4, 1], b"w")
    for mode in ("off", "auto"):
        with pytest.raises(ImatrixError, match="expert id out of range"):
            _acc(mode).moe("e", src0, src1, ids_t)
    y = np.ones((20, 16), dtype=np.float32)
    y[3, 4] = np.nan
    for mode in ("off", "auto"):
        with pytest.raises(ImatrixError, match="non-finite"):
            _acc(mode).dense("w", _weight(16), _tensor(y, ggml.GGML_TYPE_F32, [16, 20, 1, 1], b"y"))


def test_device_sums_are_deterministic(fake: FakeCupy) -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 64)).astype(np.float32)
    src1 = _tensor(x, ggml.GGML_TYPE_F32, [64, 300, 1, 1], b"x")
    ids = np.stack([rng.choice(8, 2, replace=False) for _ in range(300)]).astype(np.int32)
    ids_t = _tensor(ids, ggml.GGML_TYPE_I32, [2, 300, 1, 1], b"ids")
    experts = _tensor(None, ggml.GGML_TYPE_F16, [64, 8, 8, 1], b"blk.0.ffn_up_exps.weight")
    a, b = _acc("auto"), _acc("auto")
    for acc in (a, b):
        acc.dense("w", _weight(64), src1)
        acc.moe("e", experts, _tensor(x, ggml.GGML_TYPE_F32, [64, 1, 300, 1], b"x"), ids_t)
    for n in ("w", "e"):
        assert a.entries[n].values.tobytes() == b.entries[n].values.tobytes()
        assert a.entries[n].sums.tobytes() == b.entries[n].sums.tobytes()
    assert a.device.n_device == 2


# -- selection and fallback -------------------------------------------------------------


def test_missing_cupy_falls_back_with_one_log_line(no_cupy: None, caplog) -> None:
    caplog.set_level(logging.INFO, logger="imatrix.collect")
    rng = np.random.default_rng(5)
    x = rng.normal(size=(20, 32)).astype(np.float32)
    src1 = _tensor(x, ggml.GGML_TYPE_F32, [32, 20, 1, 1], b"x")
    fallback, host = _acc("auto"), _acc("off")
    host.device.off_reason = "the reference: never on the device"  # and nothing logged
    for _ in range(3):
        fallback.dense("w", _weight(32), src1)
        host.dense("w", _weight(32), src1)
    lines = [r.getMessage() for r in caplog.records if FALLBACK in r.getMessage()]
    assert len(lines) == 1 and "CuPy is not installed" in lines[0], lines
    assert fallback.device.n_device == 0
    assert fallback.entries["w"].values.tobytes() == host.entries["w"].values.tobytes()


def test_switches(no_cupy: None, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="imatrix.collect")
    monkeypatch.setenv(ENV, "sideways")
    with pytest.raises(ImatrixError, match=ENV):
        DeviceSums()
    monkeypatch.setenv(ENV, "ON")
    assert DeviceSums().mode == "on"
    x = np.ones((20, 16), dtype=np.float32)
    src1 = _tensor(x, ggml.GGML_TYPE_F32, [16, 20, 1, 1], b"x")
    with pytest.raises(ImatrixError, match=f"{ENV}=on but .*CuPy is not installed"):
        DeviceSums().dense("w", src1, 1, 1)
    monkeypatch.setenv(ENV, "off")
    off = DeviceSums()
    assert off.dense("w", src1, 1, 1) is None and off.dense("w", src1, 1, 1) is None
    lines = [r.getMessage() for r in caplog.records if FALLBACK in r.getMessage()]
    assert lines == [f"activations in device memory are {FALLBACK}: {ENV}=off"]


def test_host_tensors_never_touch_the_device_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real buffer check, on a tensor in a CPU buffer: host memory, no CuPy needed."""
    lib = device._buffer_lib()  # also checks the buffer functions on a live CPU buffer
    monkeypatch.setattr(device, "load_cupy", lambda: pytest.fail("CuPy loaded for host memory"))
    buf = lib.ggml_backend_buft_alloc_buffer(lib.ggml_backend_cpu_buffer_type(), 4096)
    try:
        t = ggml.GGMLTensor()
        t.buffer = buf
        t.data = lib.ggml_backend_buffer_get_base(buf)
        assert device.buffer_name(t) is None
        assert DeviceSums("on").device_of(t) is None
    finally:
        lib.ggml_backend_buffer_free(buf)
    assert device.buffer_name(ggml.GGMLTensor()) is None


# -- a whole collection through the device path ----------------------------------------


def test_collect_through_the_device_path(
    tiny_model, calib_text, tmp_path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """Dense and MoE models: the fake device path gives the host path's counts and sums
    within 1e-6; without CuPy, exactly the host path's bytes. (Repeats giving the same
    bytes: test_device_sums_are_deterministic.)"""
    toks = tmp_path / "t.npy"
    tokenize_file(tiny_model, calib_text, toks)
    s = CollectSettings(n_ctx=128, last_chunk=2, compute_ppl=False, threads=2)
    host = collect(tiny_model, toks, None, s).data.entries
    f, real_loader = FakeCupy(), device.load_cupy
    monkeypatch.setattr(device, "load_cupy", lambda: f)
    monkeypatch.setattr(device, "buffer_name", lambda t: "CUDA0" if t.data else None)
    on_device = collect(tiny_model, toks, None, s).data.entries
    assert f.pointers, "the device path did not run"
    assert set(on_device) == set(host)
    for n, e in on_device.items():
        np.testing.assert_array_equal(e.counts, host[n].counts, err_msg=n)
        np.testing.assert_allclose(e.values, host[n].values, rtol=1e-6, atol=0, err_msg=n)
    caplog.set_level(logging.INFO, logger="imatrix.collect")
    monkeypatch.setattr(device, "load_cupy", real_loader)
    monkeypatch.setitem(sys.modules, "cupy", None)
    fallback = collect(tiny_model, toks, None, s).data.entries
    for n, e in fallback.items():
        assert e.values.tobytes() == host[n].values.tobytes(), n
    assert sum(FALLBACK in r.getMessage() for r in caplog.records) == 1


def test_a_failing_device_switches_to_the_host_once(
    fake: FakeCupy, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """A GPU error mid-run (e.g. out of memory): one warning, then the host path; with
    IMATRIX_DEVICE_SUMS=on the collection fails instead."""
    caplog.set_level(logging.INFO, logger="imatrix.collect")
    x = np.random.default_rng(6).normal(size=(20, 16)).astype(np.float32)
    src1 = _tensor(x, ggml.GGML_TYPE_F32, [16, 20, 1, 1], b"x")
    strict, lenient, host = _acc("on"), _acc("auto"), _acc("off")
    host.device.off_reason = "the reference"
    for acc in (strict, lenient, host):
        acc.dense("w", _weight(16), src1)  # loads the fake, which works at first

    def broken(*_: object, **__: object) -> None:
        raise MemoryError("out of device memory")

    monkeypatch.setattr(fake, "stack", broken, raising=False)
    with pytest.raises(ImatrixError, match=f"{ENV}=on but .*out of device memory"):
        strict.dense("w", _weight(16), src1)
    for _ in range(2):
        lenient.dense("w", _weight(16), src1)
        host.dense("w", _weight(16), src1)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "out of device memory" in warnings[0].getMessage()
    assert lenient.device.n_device == 1
    np.testing.assert_allclose(lenient.entries["w"].values, host.entries["w"].values, rtol=1e-6)
