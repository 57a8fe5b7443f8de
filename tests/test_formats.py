"""Readers, writers and the CLI's handling of bad input (one line, exit 1, nothing touched)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from ci import skip_or_fail

from imatrix.atomic import atomic_write
from imatrix.cli import main
from imatrix.errors import ImatrixError
from imatrix.formats import (
    detect_format,
    read_imatrix,
    to_dat_bytes,
    to_gguf_bytes,
    write_imatrix,
)
from imatrix.model import Entry, ImatrixData, Provenance, combine


def make_data(seed: int = 0, n_expert: int = 4, with_sums: bool = True) -> ImatrixData:
    rng = np.random.default_rng(seed)
    entries = {}
    for layer in range(2):
        for kind, n in (("attn_q", 1), ("ffn_up_exps", n_expert)):
            vals = rng.random(8 * n) * 10
            counts = rng.integers(1, 200, n).astype(float)
            sums = rng.standard_normal(8 * n) if with_sums else None
            entries[f"blk.{layer}.{kind}.weight"] = Entry(vals, counts, sums)
    return ImatrixData(
        entries=entries,
        datasets=["calib.txt"],
        chunk_count=3,
        chunk_size=64,
        provenance=Provenance(
            model_sha256="ab" * 32, dataset_sha256=["cd" * 32], tokenizer='{"add_bos": true}'
        ),
    )


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_extended_gguf_round_trip(tmp_path):
    data = make_data()
    p = tmp_path / "x.gguf"
    write_imatrix(data, p)
    back = read_imatrix(p)
    assert back.datasets == data.datasets and back.chunk_size == 64 and back.chunk_count == 3
    assert back.provenance.model_sha256 == data.provenance.model_sha256
    assert back.provenance.dataset_sha256 == data.provenance.dataset_sha256
    assert back.provenance.tokenizer == data.provenance.tokenizer
    assert back.has_sums
    for name, e in data.entries.items():
        b = back.entries[name]
        np.testing.assert_array_equal(b.values, e.values.astype(np.float32))
        np.testing.assert_array_equal(b.counts, e.counts)
        np.testing.assert_array_equal(b.sums, e.sums.astype(np.float32))
    # writing what we read gives the same bytes
    assert to_gguf_bytes(back) == p.read_bytes()


def test_compat_drops_extensions():
    blob = to_gguf_bytes(make_data(), compat=True)
    assert b"in_sum2" in blob and b".in_sum\x00" not in blob and b"imatrix_pipeline" not in blob
    assert b".in_sum" not in blob.replace(b".in_sum2", b"")


def test_format_detected_by_content_not_name(tmp_path):
    data = make_data(with_sums=False)
    p = tmp_path / "looks-like.dat"
    p.write_bytes(to_gguf_bytes(data))
    assert detect_format(p) == "gguf"
    q = tmp_path / "looks-like.gguf"
    q.write_bytes(to_dat_bytes(data))
    assert detect_format(q) == "dat"
    assert set(read_imatrix(q, chunk_size=64).entries) == set(data.entries)


def test_dat_values_and_trailer():
    data = make_data(n_expert=1, with_sums=False)
    blob = to_dat_bytes(data)
    (n,) = struct.unpack_from("<i", blob, 0)
    assert n == len(data.entries)
    # trailer: chunk count then the last dataset's name
    name = b"calib.txt"
    assert blob.endswith(struct.pack("<i", 3) + struct.pack("<i", len(name)) + name)


def test_weighted_combine_scales_sums_and_counts():
    a, b = make_data(1), make_data(2)
    out = combine([a, b], weights=[2.0, 4.0])  # normalized to 1, 2
    name = "blk.0.attn_q.weight"
    exp = a.entries[name].values.astype(np.float32) + (
        b.entries[name].values.astype(np.float32) * np.float32(2)
    )
    np.testing.assert_array_equal(out.entries[name].values, exp)
    np.testing.assert_array_equal(
        out.entries[name].counts, a.entries[name].counts + 2 * b.entries[name].counts
    )
    assert out.datasets == ["calib.txt", "calib.txt"]


def test_combine_refuses_other_model_unless_forced():
    a, b = make_data(1), make_data(2)
    b.provenance.model_sha256 = "ef" * 32
    with pytest.raises(ImatrixError, match="different models"):
        combine([a, b])
    assert combine([a, b], force=True).provenance.model_sha256 is None


def test_combine_refuses_shape_mismatch_naming_tensor():
    a, b = make_data(1), make_data(2)
    b.entries["blk.1.attn_q.weight"] = Entry(np.ones(16), np.ones(1))
    with pytest.raises(ImatrixError, match=r"blk\.1\.attn_q\.weight"):
        combine([a, b], sources=["a", "b"])


def test_combine_broadcasts_single_count():
    a, b = make_data(1), make_data(2)
    name = "blk.0.ffn_up_exps.weight"
    b.entries[name] = Entry(b.entries[name].values, np.array([5.0]))
    out = combine([a, b])
    np.testing.assert_array_equal(out.entries[name].counts, a.entries[name].counts + 5)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "out.gguf"
    p.write_bytes(b"precious")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(ImatrixError, match="no space left"):
        atomic_write(p, b"new content")
    assert p.read_bytes() == b"precious"
    assert [x.name for x in tmp_path.iterdir()] == ["out.gguf"]  # no temp file left


def test_means_like_llama_quantize():
    data = make_data()
    e = data.entries["blk.0.ffn_up_exps.weight"]
    e.counts[1] = 0
    m = data.means()["blk.0.ffn_up_exps.weight"].reshape(4, 8)
    np.testing.assert_array_equal(m[1], np.ones(8, np.float32))
    np.testing.assert_array_equal(m[0], e.values[:8].astype(np.float32) / np.float32(e.counts[0]))


# --- CLI: bad input gives one line, exit 1, and leaves files alone ------------


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_clean_line(err: str, *needles: str) -> None:
    lines = [x for x in err.splitlines() if "error" in x]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def good(tmp_path) -> Path:
    p = tmp_path / "good.gguf"
    write_imatrix(make_data(), p)
    return p


@pytest.fixture
def existing_out(tmp_path) -> Path:
    p = tmp_path / "existing-output.gguf"
    p.write_bytes(b"user's earlier result")
    return p


def _bad_inputs(tmp_path: Path, good: Path, dense_model: Path) -> dict[str, Path]:
    blob = good.read_bytes()
    cases = {}

    def put(name: str, content: bytes) -> None:
        cases[name] = tmp_path / name
        cases[name].write_bytes(content)

    put("truncated.gguf", blob[: len(blob) // 2])
    put("header-only.gguf", blob[:20])
    put("empty.gguf", b"")
    put("lying.dat", struct.pack("<i", 1000) + b"\x05\x00\x00\x00abcde")
    put("negative-name.dat", struct.pack("<ii", 1, -4) + bytes(24))
    put("trailing-garbage.dat", to_dat_bytes(make_data(with_sums=False)) + b"xyz")
    nan = make_data()
    nan.entries["blk.0.attn_q.weight"].values[3] = np.nan
    put("nan.gguf", to_gguf_bytes(nan))
    neg = make_data()
    neg.entries["blk.1.attn_q.weight"].values[0] = -1
    put("negative.gguf", to_gguf_bytes(neg))
    cases["model.gguf"] = dense_model
    cases["missing.gguf"] = tmp_path / "does-not-exist.gguf"
    cases["directory"] = tmp_path
    return cases


EXPECT = {
    "truncated.gguf": "truncated",
    "header-only.gguf": "truncated",
    "empty.gguf": "empty",
    "lying.dat": "entries",
    "negative-name.dat": "name length",
    "trailing-garbage.dat": "trailing",
    "nan.gguf": "blk.0.attn_q.weight",
    "negative.gguf": "blk.1.attn_q.weight",
    "model.gguf": "model",
    "missing.gguf": "no such file",
    "directory": "directory",
}


@pytest.mark.parametrize("case", sorted(EXPECT))
@pytest.mark.parametrize("command", ["convert", "combine"])
def test_bad_input_one_line_exit_1(
    case, command, tmp_path, good, existing_out, dense_model, capsys
):
    bad = _bad_inputs(tmp_path, good, dense_model)[case]
    before = sha(existing_out)
    args = (
        [command, bad, "-o", existing_out]
        if command == "convert"
        else [command, good, bad, "-o", existing_out]
    )
    rc, _out, err = _cli(capsys, *args)
    assert rc == 1
    _one_clean_line(err, EXPECT[case])
    assert sha(existing_out) == before


def test_output_in_missing_directory(tmp_path, good, capsys):
    rc, _, err = _cli(capsys, "convert", good, "-o", tmp_path / "nope" / "x.gguf")
    assert rc == 1
    _one_clean_line(err, "does not exist")


def test_output_in_read_only_directory(tmp_path, good, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    # root ignores modes: make the directory immutable instead
    if (
        os.geteuid() == 0
        and subprocess.run(["chattr", "+i", str(ro)], capture_output=True, timeout=60).returncode
        != 0
    ):
        skip_or_fail("cannot make a directory read-only for root here (chattr +i)")
    try:
        rc, _, err = _cli(capsys, "convert", good, "-o", ro / "x.gguf")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(ro)], check=True, timeout=60)
    assert rc == 1
    _one_clean_line(err, "permission denied")
    assert not any(ro.iterdir())


def test_bad_weights_and_usage(tmp_path, good, capsys):
    rc, _, err = _cli(capsys, "combine", good, good, "-o", tmp_path / "x", "--weights", "1,zz")
    assert rc == 1
    _one_clean_line(err, "--weights")
    rc, _, err = _cli(capsys, "combine", good, good, "-o", tmp_path / "x", "--weights", "1")
    assert rc == 1
    _one_clean_line(err, "2 inputs")
    with pytest.raises(SystemExit) as exc:
        main(["combine", str(good)])  # missing -o: usage error
    assert exc.value.code == 2


def test_info_json(good, capsys):
    rc, out, _ = _cli(capsys, "info", good, "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["tensors"] == 4 and info["experts"] == 4 and info["moe_tensors"] == 2
    assert info["provenance"]["model_sha256"] == "ab" * 32
    assert info["has_activation_sums"] is True
