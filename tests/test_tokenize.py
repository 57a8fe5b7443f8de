"""Tokenization as llama-imatrix does it: counts from llama-imatrix itself, and a collect
over ``--tokens`` that equals llama-imatrix's run over the text (same token ids)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from llamatools import llama_imatrix, run_until_logged

from imatrix.cli import main
from imatrix.errors import ImatrixError
from imatrix.formats import read_imatrix
from imatrix.tokenize import load_tokens, read_text, tokenize_file


def llama_token_count(llama_bin: Path, model: Path, text: Path, *extra: str) -> int:
    """The count llama-imatrix reports when a text is too short for its context."""
    _, m = run_until_logged(
        llama_bin,
        "llama-imatrix",
        "-m",
        model,
        "-f",
        text,
        "-c",
        "1000000",
        *extra,
        pattern=r"tokenizes to only (\d+) tokens",
        returncode=1,
    )
    return int(m.group(1))


@pytest.fixture(scope="module")
def special_text(tmp_path_factory) -> Path:
    """Text with control-token spellings, so --parse-special changes the tokens."""
    p = tmp_path_factory.mktemp("txt") / "special.txt"
    p.write_text(
        "<s>The old house</s> stood at the end <s> of the road.\n\nwater</s>\n", encoding="utf-8"
    )
    return p


@pytest.mark.parametrize("parse_special", [False, True])
def test_counts_match_llama_imatrix(
    dense_model, calib_text, special_text, llama_bin, tmp_path, parse_special
):
    extra = ["--parse-special"] if parse_special else []
    for text in (calib_text, special_text):
        out = tmp_path / f"{text.stem}.npy"
        rec = tokenize_file(dense_model, text, out, parse_special=parse_special)
        assert rec["n_tokens"] == llama_token_count(llama_bin, dense_model, text, *extra)


def test_parse_special_makes_control_tokens(dense_model, special_text, tmp_path):
    tokenize_file(dense_model, special_text, tmp_path / "a.npy")
    plain, _ = load_tokens(tmp_path / "a.npy")
    tokenize_file(dense_model, special_text, tmp_path / "b.npy", parse_special=True)
    special, meta = load_tokens(tmp_path / "b.npy")
    assert plain[0] == special[0] == 1  # BOS added in both
    assert np.count_nonzero(special == 1) == 3 and np.count_nonzero(special == 2) == 2
    assert np.count_nonzero(plain == 2) == 0 and np.count_nonzero(plain == 1) == 1
    assert meta["parse_special"] is True and meta["add_bos"] is True


def test_record_and_files(dense_model, calib_text, tmp_path):
    out = tmp_path / "sub" / "tokens.npy"
    out.parent.mkdir()
    rec = tokenize_file(dense_model, calib_text, out)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved == rec
    import hashlib

    assert rec["text_sha256"] == hashlib.sha256(calib_text.read_bytes()).hexdigest()
    assert rec["model_sha256"] == hashlib.sha256(dense_model.read_bytes()).hexdigest()
    assert rec["n_vocab"] == 557 and rec["tokenizer"]["meta"]["tokenizer.ggml.model"] == "llama"
    arr = np.load(out)
    assert arr.dtype == np.int32 and arr.size == rec["n_tokens"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["tokens.json", "tokens.npy"]


def test_one_trailing_newline_is_dropped(tmp_path):
    for raw, want in ((b"abc\n", b"abc"), (b"abc\n\n", b"abc\n"), (b"abc", b"abc"), (b"", b"")):
        p = tmp_path / "t.txt"
        p.write_bytes(raw)
        assert read_text(p) == want


def test_load_tokens_checks_its_record(dense_model, calib_text, tmp_path):
    out = tmp_path / "t.npy"
    tokenize_file(dense_model, calib_text, out)
    rec = json.loads(out.with_suffix(".json").read_text())
    rec["n_tokens"] += 1
    out.with_suffix(".json").write_text(json.dumps(rec))
    with pytest.raises(ImatrixError, match="records"):
        load_tokens(out)
    np.save(tmp_path / "bad.npy", np.zeros((2, 2), dtype=np.int32))
    with pytest.raises(ImatrixError, match="1-D"):
        load_tokens(tmp_path / "bad.npy")


def test_collect_from_tokens_equals_llama_on_text(
    moe_model, calib_text, llama_bin, tmp_path, capsys
):
    """Same token ids: collecting over our tokens gives llama-imatrix's data for the text."""
    toks = tmp_path / "calib.npy"
    assert main(["tokenize", "-m", str(moe_model), "-f", str(calib_text), "-o", str(toks)]) == 0
    ref = tmp_path / "ref.gguf"
    flags = ["-c", "128", "--chunks", "6", "--no-ppl"]
    llama_imatrix(llama_bin, "-m", moe_model, "-f", calib_text, "-o", ref, *flags)
    ours = tmp_path / "ours.gguf"
    assert (
        main(["collect", "-m", str(moe_model), "--tokens", str(toks), "-o", str(ours), *flags]) == 0
    )
    a, b = read_imatrix(ours), read_imatrix(ref)
    assert a.datasets == b.datasets == [str(calib_text)]
    for name, e in b.entries.items():
        np.testing.assert_array_equal(a.entries[name].counts, e.counts)
        np.testing.assert_allclose(a.entries[name].values, e.values, rtol=1e-4)


def test_cli_errors(dense_model, tmp_path, capsys):
    rc = main(
        [
            "tokenize",
            "-m",
            str(dense_model),
            "-f",
            str(tmp_path / "missing.txt"),
            "-o",
            str(tmp_path / "t.npy"),
        ]
    )
    assert rc == 1
    assert "missing.txt: no such text file" in capsys.readouterr().err
    rc = main(
        [
            "tokenize",
            "-m",
            str(tmp_path / "nomodel.gguf"),
            "-f",
            str(dense_model),
            "-o",
            str(tmp_path / "t.npy"),
        ]
    )
    assert rc == 1
    assert not (tmp_path / "t.npy").exists()
