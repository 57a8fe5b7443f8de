"""``imatrix collect`` as a command: llama-imatrix's checks, messages, verbosity, exit codes."""

from __future__ import annotations

import pytest
from llamatools import run_tool

from imatrix.cli import main


def run(capsys, *args: object) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["collect", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def two_chunk_imatrix(capsys, model, text, out):
    """``out``, collected from two chunks of 128 tokens without perplexity."""
    rc, _, err = run(
        capsys, "-m", model, "-f", text, "-o", out, "-c", 128, "--chunks", 2, "--no-ppl"
    )
    assert rc == 0, err
    return out


def test_chunk_bounds_as_llama_imatrix(dense_model, calib_text, llama_bin, tmp_path, capsys):
    """--chunk keeps llama-imatrix's check: (chunk + 2) * n_ctx must stay below the token count
    (8665 tokens: chunk 65 of 128 passes, 66 fails)."""
    o = tmp_path / "o.gguf"
    for chunk, ok in ((65, True), (66, False)):
        ref = run_tool(
            llama_bin,
            "llama-imatrix",
            "-m",
            dense_model,
            "-f",
            calib_text,
            "-o",
            o,
            "-c",
            "128",
            "--chunk",
            chunk,
            "--no-ppl",
            check=False,
        )
        rc, _, err = run(
            capsys,
            "-m",
            dense_model,
            "-f",
            calib_text,
            "-o",
            o,
            "-c",
            128,
            "--chunk",
            chunk,
            "--no-ppl",
        )
        assert (ref.returncode == 0) == ok == (rc == 0), err
        if not ok:
            # only our message is checked: llama-imatrix's asynchronous logger often
            # loses its last lines when the process exits (its exit code is checked above)
            assert "not enough tokens left after removing 66 chunks" in err


def test_too_few_tokens(dense_model, calib_text, tmp_path, capsys):
    rc, _, err = run(
        capsys, "-m", dense_model, "-f", calib_text, "-o", tmp_path / "o.gguf", "-c", 5000
    )
    assert rc == 1
    assert "you need at least 10000 tokens" in err and "only 8665 tokens" in err
    assert len(err.strip().splitlines()[-1]) > 0


def test_missing_inputs(dense_model, calib_text, tmp_path, capsys):
    rc, _, err = run(capsys, "-f", calib_text, "-o", tmp_path / "o.gguf")
    assert rc == 1 and "-m/--model is required" in err
    rc, _, err = run(capsys, "-o", tmp_path / "o.gguf")
    assert rc == 1 and "--in-file" in err
    rc, _, err = run(
        capsys, "-m", tmp_path / "none.gguf", "-f", calib_text, "-o", tmp_path / "o.gguf"
    )
    assert rc == 1 and "none.gguf" in err
    rc, _, err = run(
        capsys, "-m", dense_model, "-f", calib_text, "-o", tmp_path / "o.gguf", "-c", 0
    )
    assert rc == 1 and "ctx-size" in err
    assert not (tmp_path / "o.gguf").exists()


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["collect", "--chunk", "x"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["collect", "-f", "a", "--tokens", "b"])
    assert e.value.code == 2


def test_verbosity_levels(dense_model, calib_text, tmp_path, capsys):
    base = (
        "-m",
        dense_model,
        "-f",
        calib_text,
        "-o",
        tmp_path / "o.gguf",
        "-c",
        128,
        "--chunks",
        2,
    )
    rc, out, err = run(capsys, *base, "-lv", 0)
    assert rc == 0 and out.startswith("[1]") and "Final estimate: PPL = " in out
    assert "I imatrix." not in err  # no INFO messages at -lv 0
    rc, out, err = run(capsys, *base, "-lv", 1, "--no-ppl")
    assert rc == 0 and out == "" and "stored 14 entries after 2 chunks" in err
    assert "collect_imatrix[" not in err
    rc, out, err = run(capsys, *base, "-lv", 2, "--no-ppl")
    assert rc == 0 and "collect_imatrix[0]:" in err and "blk.1.ffn_down.weight" in err


def test_show_statistics(dense_model, calib_text, tmp_path, capsys):
    im = two_chunk_imatrix(capsys, dense_model, calib_text, tmp_path / "o.gguf")
    rc, out, _ = run(capsys, "--in-file", im, "--show-statistics")
    assert rc == 0 and f"statistics for {im} (14 tensors)" in out and "ffn_down" in out
    rc, _, err = run(capsys, "--in-file", im, "--in-file", im, "--show-statistics")
    assert rc == 1 and "single imatrix file" in err


def test_show_statistics_without_stats_library(
    monkeypatch, dense_model, calib_text, tmp_path, capsys
):
    import sys

    im = two_chunk_imatrix(capsys, dense_model, calib_text, tmp_path / "o.gguf")
    monkeypatch.setitem(sys.modules, "imatrix.stats", None)  # import fails as if missing
    rc, _, err = run(capsys, "--in-file", im, "--show-statistics")
    assert rc == 1 and "render_statistics" in err
