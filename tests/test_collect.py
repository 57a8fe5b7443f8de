"""Parity of ``imatrix collect`` with the real llama-imatrix, on the tiny dense and MoE models.

Each case runs llama-imatrix and our CLI with the same flags and requires: the same
tensor set, identical counts, sums within 1e-4 relative per element (llama-imatrix
accumulates in float32, we in float64), the same chunk count, chunk size and
datasets, and the same per-chunk and final perplexity.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from llamatools import llama_imatrix, run_until_logged

from imatrix.cli import main
from imatrix.formats import read_imatrix

#: (id, flags shared by both tools)
CASES = [
    # n_batch 512 > n_ctx 128: four sequences per batch, three batches
    ("multiseq", ["-c", "128", "-b", "512", "--chunks", "12"]),
    # --chunk/--chunks with output.weight; default -b 2048: one batch of 5 sequences
    ("chunk-output", ["-c", "128", "--chunk", "3", "--chunks", "5", "--process-output"]),
    # n_batch < n_ctx: two decodes per chunk, logits gathered across them
    ("small-batch", ["-c", "64", "-b", "32", "--chunks", "4"]),
]

_CHUNK_RE = re.compile(r"\[(\d+)\]([0-9.]+),")
_FINAL_RE = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


def parse_ppl(text: str) -> tuple[list[float], float, float]:
    chunks = [float(v) for _, v in _CHUNK_RE.findall(text)]
    m = _FINAL_RE.search(text)
    assert m, f"no final estimate in:\n{text[-2000:]}"
    return chunks, float(m.group(1)), float(m.group(2))


def assert_same_ppl(ours: str, ref: str) -> None:
    oc, of, oe = parse_ppl(ours)
    rc, rf, re_ = parse_ppl(ref)
    assert len(oc) == len(rc) > 0
    for a, b in [*zip(oc, rc, strict=True), (of, rf), (oe, re_)]:
        assert f"{a:.4g}" == f"{b:.4g}", (a, b)
        assert abs(a - b) <= 1e-6 * abs(b) + 1e-4, (a, b)


def assert_same_imatrix(ours: Path, ref: Path, *, rtol: float = 1e-4) -> None:
    a, b = read_imatrix(ours), read_imatrix(ref)
    assert set(a.entries) == set(b.entries)
    assert (a.chunk_count, a.chunk_size, a.datasets) == (b.chunk_count, b.chunk_size, b.datasets)
    for name, ea in a.entries.items():
        eb = b.entries[name]
        np.testing.assert_array_equal(ea.counts, eb.counts, err_msg=name)
        assert ea.values.shape == eb.values.shape, name
        np.testing.assert_allclose(ea.values, eb.values, rtol=rtol, atol=0, err_msg=name)


@pytest.fixture(scope="module")
def reference(llama_bin, dense_model, moe_model, calib_text, tmp_path_factory):
    """llama-imatrix's file and stdout per (model, case), computed once."""
    out: dict[tuple[str, str], tuple[Path, str]] = {}
    d = tmp_path_factory.mktemp("ref")
    for kind, model in (("dense", dense_model), ("moe", moe_model)):
        for case, flags in CASES:
            path = d / f"{kind}-{case}.gguf"
            args = ("-m", model, "-f", calib_text, "-o", path, "-t", "2", *flags)
            # llama.cpp's asynchronous logger now and then loses its last lines at exit
            for _ in range(30):
                proc = llama_imatrix(llama_bin, *args)
                if _FINAL_RE.search(proc.stdout):
                    break
            out[kind, case] = (path, proc.stdout)
    return out


def run_ours(capsys, *args: object) -> str:
    capsys.readouterr()
    rc = main(["collect", *map(str, args)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


@pytest.mark.parametrize("case", [c for c, _ in CASES])
def test_parity_with_llama_imatrix(case, tiny_model, calib_text, reference, tmp_path, capsys):
    kind = "moe" if "moe" in tiny_model.name else "dense"
    flags = dict(CASES)[case]
    ref_path, ref_out = reference[kind, case]
    ours = tmp_path / "ours.gguf"
    stdout = run_ours(capsys, "-m", tiny_model, "-f", calib_text, "-o", ours, "-t", "2", *flags)
    assert_same_imatrix(ours, ref_path)
    assert_same_ppl(stdout, ref_out)
    data = read_imatrix(ours)
    assert data.has_sums  # our extension: activation sums for every tensor
    assert ("output.weight" in data.entries) == ("--process-output" in flags)


def test_no_ppl_stops_graphs_early_with_identical_data(
    tiny_model, calib_text, reference, tmp_path, capsys
):
    """--no-ppl cuts each graph after the last needed tensor: same data as llama-imatrix."""
    kind = "moe" if "moe" in tiny_model.name else "dense"
    ref_path, _ = reference[kind, "multiseq"]
    ours = tmp_path / "ours.gguf"
    stdout = run_ours(
        capsys,
        "-m",
        tiny_model,
        "-f",
        calib_text,
        "-o",
        ours,
        "-t",
        "2",
        "--no-ppl",
        *dict(CASES)["multiseq"],
    )
    assert "Final estimate" not in stdout
    assert_same_imatrix(ours, ref_path)


def test_compat_output_has_llama_layout(dense_model, calib_text, reference, tmp_path, capsys):
    ref_path, _ = reference["dense", "multiseq"]
    ours = tmp_path / "ours.gguf"
    run_ours(
        capsys,
        "-m",
        dense_model,
        "-f",
        calib_text,
        "-o",
        ours,
        "--compat",
        "--no-ppl",
        *dict(CASES)["multiseq"],
    )
    from imatrix.gguf_io import read_gguf

    a, b = read_gguf(ours), read_gguf(ref_path)
    assert sorted(a.kv) == sorted(b.kv)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert [t.ne for t in a.tensors] == [t.ne for t in b.tensors]


def test_dat_output_matches_llama(dense_model, calib_text, llama_bin, tmp_path, capsys):
    flags = ["-c", "128", "--chunks", "6", "--output-format", "dat", "--no-ppl"]
    ref = tmp_path / "ref.dat"
    llama_imatrix(llama_bin, "-m", dense_model, "-f", calib_text, "-o", ref, "-t", "2", *flags)
    ours = tmp_path / "ours.dat"
    run_ours(capsys, "-m", dense_model, "-f", calib_text, "-o", ours, *flags)
    assert_same_imatrix(ours, ref)
    assert ours.stat().st_size == ref.stat().st_size


def test_in_file_continues_like_llama(
    moe_model, calib_text, calib_text2, llama_bin, tmp_path, capsys
):
    """--in-file with -f: loaded data plus the new text (counts, datasets, chunk count)."""
    first = tmp_path / "first.gguf"
    llama_imatrix(
        llama_bin, "-m", moe_model, "-f", calib_text2, "-o", first, "-c", "128", "--chunks", "3"
    )
    flags = ["-c", "128", "--chunks", "4", "--in-file", first, "--no-ppl"]
    ref = tmp_path / "ref.gguf"
    llama_imatrix(llama_bin, "-m", moe_model, "-f", calib_text, "-o", ref, *flags)
    ours = tmp_path / "ours.gguf"
    run_ours(capsys, "-m", moe_model, "-f", calib_text, "-o", ours, *flags)
    assert_same_imatrix(ours, ref)
    assert read_imatrix(ours).datasets == [str(calib_text2), str(calib_text)]


def test_in_file_without_text_combines_without_model(
    dense_model, calib_text, calib_text2, llama_bin, tmp_path, capsys
):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    llama_imatrix(
        llama_bin,
        "-m",
        dense_model,
        "-f",
        calib_text,
        "-o",
        a,
        "-c",
        "128",
        "--chunks",
        "3",
        "--no-ppl",
    )
    llama_imatrix(
        llama_bin,
        "-m",
        dense_model,
        "-f",
        calib_text2,
        "-o",
        b,
        "-c",
        "64",
        "--chunks",
        "5",
        "--no-ppl",
    )
    ref = tmp_path / "ref.gguf"
    # llama-imatrix insists on -m here although it never loads the model; we do not
    llama_imatrix(llama_bin, "-m", dense_model, "--in-file", a, "--in-file", b, "-o", ref)
    ours = tmp_path / "ours.gguf"
    run_ours(capsys, "--in-file", f"{a},{b}", "-o", ours, "--compat")
    assert ours.read_bytes() == ref.read_bytes()


def test_nonfinite_activations_stop_the_run(tmp_path, calib_text, llama_bin, capsys):
    from tinymodels import DENSE, write_tiny_model

    model = write_tiny_model(tmp_path / "nan.gguf", DENSE, seed=1, nan_weights=True)
    proc, _ = run_until_logged(
        llama_bin,
        "llama-imatrix",
        "-m",
        model,
        "-f",
        calib_text,
        "-o",
        tmp_path / "r.gguf",
        "-c",
        "128",
        "--chunks",
        "2",
        pattern=r"non-finite values detected in blk\.1\.ffn_down\.weight",
        returncode=1,
    )
    assert proc.returncode == 1
    out = tmp_path / "ours.gguf"
    rc = main(
        [
            "collect",
            "-m",
            str(model),
            "-f",
            str(calib_text),
            "-o",
            str(out),
            "-c",
            "128",
            "--chunks",
            "2",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert "blk.1.ffn_down.weight" in err
    assert not out.exists()
