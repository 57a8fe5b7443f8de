"""Our readers and writers against llama-imatrix itself, byte for byte.

Reference imatrices are made by the real llama-imatrix (built from the pinned
source) on the tiny dense and MoE models; then every conversion and combination is
done twice, once by ``llama-imatrix --in-file ...`` and once by us, and the files
must be identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from llamatools import llama_imatrix, run_tool

from imatrix.cli import main
from imatrix.formats import read_imatrix, to_gguf_bytes, write_imatrix

N_CTX = 64


@pytest.fixture(scope="module", params=["dense", "moe"])
def refs(request, tmp_path_factory, llama_bin, dense_model, moe_model, calib_text):
    """Three llama-imatrix outputs over disjoint chunk ranges, plus a legacy .dat of one."""
    model = dense_model if request.param == "dense" else moe_model
    d = tmp_path_factory.mktemp(f"refs-{request.param}")
    common = ("-m", model, "-f", calib_text, "-c", N_CTX, "-b", N_CTX, "--no-ppl")
    a, b, c = d / "a.gguf", d / "b.gguf", d / "c.gguf"
    llama_imatrix(llama_bin, *common, "-o", a, "--chunks", 5)
    llama_imatrix(llama_bin, *common, "-o", b, "--chunk", 5, "--chunks", 3)
    llama_imatrix(llama_bin, *common, "-o", c, "--chunk", 9, "--chunks", 2, "--process-output")
    dat = d / "a.dat"
    llama_imatrix(
        llama_bin, "-m", model, "--in-file", a, "-o", dat, "--output-format", "dat", "-c", N_CTX
    )
    return {"model": model, "dir": d, "a": a, "b": b, "c": c, "dat": dat}


def _llama_in_file(llama_bin, refs, inputs, out, fmt="gguf"):
    args = ["-m", refs["model"]]
    for p in inputs:
        args += ["--in-file", p]
    llama_imatrix(llama_bin, *args, "-o", out, "--output-format", fmt, "-c", N_CTX)


def _ours(*argv) -> None:
    assert main([str(a) for a in argv]) == 0


def _same(p: Path, q: Path) -> None:
    a, b = p.read_bytes(), q.read_bytes()
    assert len(a) == len(b), f"{p} has {len(a)} bytes, {q} has {len(b)}"
    assert a == b, f"{p} and {q} differ from byte {next(i for i in range(len(a)) if a[i] != b[i])}"


def test_reference_is_what_we_expect(refs):
    data = read_imatrix(refs["a"])
    assert data.chunk_count == 5 and data.chunk_size == N_CTX
    assert all(name.startswith("blk.") for name in data.entries)
    moe = any(e.n_counts == 4 for e in data.entries.values())
    assert moe == (refs["model"].name == "tiny-moe.gguf")
    # our writer reproduces llama-imatrix's own collection output
    assert to_gguf_bytes(data, compat=True) == refs["a"].read_bytes()


@pytest.mark.parametrize("key", ["a", "c"])
def test_gguf_round_trip(refs, llama_bin, key, tmp_path):
    _llama_in_file(llama_bin, refs, [refs[key]], tmp_path / "llama.gguf")
    _ours("convert", refs[key], "-o", tmp_path / "ours.gguf", "--compat")
    _same(tmp_path / "llama.gguf", tmp_path / "ours.gguf")


@pytest.mark.parametrize("key", ["a", "c"])
def test_gguf_to_dat(refs, llama_bin, key, tmp_path):
    _llama_in_file(llama_bin, refs, [refs[key]], tmp_path / "llama.dat", "dat")
    _ours("convert", refs[key], "-o", tmp_path / "ours.dat", "--output-format", "dat")
    _same(tmp_path / "llama.dat", tmp_path / "ours.dat")


def test_dat_to_gguf(refs, llama_bin, tmp_path):
    _llama_in_file(llama_bin, refs, [refs["dat"]], tmp_path / "llama.gguf")
    _ours("convert", refs["dat"], "-o", tmp_path / "ours.gguf", "-c", N_CTX, "--compat")
    _same(tmp_path / "llama.gguf", tmp_path / "ours.gguf")


def test_dat_to_dat(refs, llama_bin, tmp_path):
    _llama_in_file(llama_bin, refs, [refs["dat"]], tmp_path / "llama.dat", "dat")
    _ours(
        "convert", refs["dat"], "-o", tmp_path / "ours.dat", "-c", N_CTX, "--output-format", "dat"
    )
    _same(tmp_path / "llama.dat", tmp_path / "ours.dat")


@pytest.mark.parametrize(
    "keys,fmt",
    [
        (("a", "b"), "gguf"),
        (("a", "b", "c"), "gguf"),
        (("a", "b", "c"), "dat"),
        (("b", "dat", "c"), "gguf"),
        (("dat", "a"), "dat"),
    ],
)
def test_combine(refs, llama_bin, keys, fmt, tmp_path):
    inputs = [refs[k] for k in keys]
    out_l, out_o = tmp_path / f"llama.{fmt}", tmp_path / f"ours.{fmt}"
    _llama_in_file(llama_bin, refs, inputs, out_l, fmt)
    _ours("combine", *inputs, "-o", out_o, "-c", N_CTX, "--output-format", fmt, "--compat")
    _same(out_l, out_o)


def test_three_way_combine_rounds_in_float32(refs):
    """The sums of a three-way combine are float32 additions in input order, not a
    float64 sum rounded once (which would differ in the last bit somewhere)."""
    items = [read_imatrix(refs[k]) for k in ("a", "b", "c")]
    name = next(iter(items[0].entries))
    f32 = [it.entries[name].values.astype(np.float32) for it in items]
    from imatrix.model import combine

    got = combine(items).entries[name].values
    np.testing.assert_array_equal(got, ((f32[0] + f32[1]) + f32[2]).astype(np.float64))


def test_zero_count_experts(refs, llama_bin, tmp_path):
    """Experts that never fired: GGUF keeps them, .dat stores 1.0 for them and drops
    entries with no data at all, exactly as llama-imatrix does."""
    data = read_imatrix(refs["a"])
    names = sorted(data.entries)
    first, second = data.entries[names[0]], data.entries[names[1]]
    first.counts[:] = 0  # no data at all: dropped from .dat
    first.values[:] = 0
    second.counts[-1] = 0  # partial (or, for dense, none)
    second.values.reshape(second.n_counts, -1)[-1] = 0
    crafted = tmp_path / "crafted.gguf"
    write_imatrix(data, crafted, compat=True)
    for fmt in ("gguf", "dat"):
        _llama_in_file(llama_bin, refs, [crafted], tmp_path / f"llama.{fmt}", fmt)
        _ours(
            "convert", crafted, "-o", tmp_path / f"ours.{fmt}", "--output-format", fmt, "--compat"
        )
        _same(tmp_path / f"llama.{fmt}", tmp_path / f"ours.{fmt}")
    back = read_imatrix(tmp_path / "ours.dat", chunk_size=N_CTX)
    assert names[0] not in back.entries


def test_extended_gguf_quantizes_like_compat(refs, llama_bin, tmp_path):
    """Our extended GGUF (in_sum tensors, provenance keys) loads in llama-quantize and
    gives the same quantized bytes as llama-imatrix's own layout."""
    data = read_imatrix(refs["a"])
    rng = np.random.default_rng(0)
    for e in data.entries.values():
        e.sums = rng.standard_normal(e.values.size)
    data.provenance.model_sha256 = "0" * 64
    data.provenance.dataset_sha256 = ["1" * 64]
    # same-length paths: llama-quantize records the imatrix path in the model
    (tmp_path / "e").mkdir()
    (tmp_path / "c").mkdir()
    ext, compat = tmp_path / "e" / "im.gguf", tmp_path / "c" / "im.gguf"
    write_imatrix(data, ext)
    write_imatrix(data, compat, compat=True)
    assert ext.stat().st_size > compat.stat().st_size
    outs = []
    for im in (ext, compat):
        out = im.parent / "q.gguf"
        run_tool(llama_bin, "llama-quantize", "--imatrix", im, refs["model"], out, "Q4_K_M", 1)
        outs.append(out.read_bytes())
    a, b = outs
    assert len(a) == len(b)
    diff = np.flatnonzero(np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8))
    # only the one byte of the path that names the directory ('e' vs 'c') differs
    assert diff.size == 1, f"{diff.size} bytes differ"
