"""Evaluation parity: our PPL, KLD and top-token agreement against llama-perplexity's.

Two comparisons with the real llama-perplexity (built from the pinned source), on the
tiny dense and MoE models and quants made from them:

- ``kld_method="llama"`` compares against the base's log-probabilities exactly as
  llama-perplexity stores them (uint16, cut at -16); with llama-perplexity run on the
  same batch layout (``-b n_ctx``: one sequence per batch, as we decode) every
  statistic agrees to float rounding. This pins down the tokens, chunks, BOS
  handling, scored positions and formulas.
- the default exact method against llama-perplexity with its default settings: within
  1 % relative (or 1e-4 absolute), the issue's criterion.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from imatrix.errors import ImatrixError
from imatrix.evaluate import SUMMARY_COLUMNS, default_rows, evaluate, merge_summaries, write_summary
from imatrix.quantize import quantize

N_CTX = 128
CHUNKS = 12


@pytest.fixture(scope="session")
def quants(tmp_path_factory, dense_model: Path, moe_model: Path) -> dict[str, dict[str, Path]]:
    d = tmp_path_factory.mktemp("evalquants")
    out: dict[str, dict[str, Path]] = {}
    for kind, model in (("dense", dense_model), ("moe", moe_model)):
        out[kind] = {}
        for t in ("Q2_K", "Q6_K"):
            out[kind][t] = quantize(model, d / f"{kind}-{t}.gguf", t)
    return out


def _kind(model: Path) -> str:
    return "moe" if "moe" in model.name else "dense"


def _num(text: str, label: str) -> float:
    m = re.search(re.escape(label) + r"\s*:\s*(-?[\d.]+)", text)
    assert m, f"'{label}' not in llama-perplexity output"
    return float(m.group(1))


@pytest.fixture(scope="session")
def flush_logs_env(tmp_path_factory) -> dict[str, str]:
    """Environment that makes llama-perplexity's final statistics reliably appear.

    llama.cpp's tools log through an asynchronous logger that is never flushed at exit
    (upstream issue 22142): on a busy machine the last lines, which hold the final
    statistics, are often lost. A preloaded library whose destructor waits half a
    second at exit lets the logger thread finish. Without a C compiler we fall back to
    retrying.
    """
    import os
    import shutil

    env = dict(os.environ)
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc:
        d = tmp_path_factory.mktemp("flushlog")
        (d / "delay.c").write_text(
            "#include <unistd.h>\n"
            "__attribute__((destructor)) static void wait_for_log(void) { usleep(500000); }\n"
        )
        r = subprocess.run(
            [cc, "-shared", "-fPIC", "-o", str(d / "libdelay.so"), str(d / "delay.c")],
            timeout=120,
        )
        if r.returncode == 0:
            env["LD_PRELOAD"] = str(d / "libdelay.so")
    return env


def llama_perplexity_kld(
    env: dict[str, str],
    llama_bin: Path,
    base: Path,
    quant: Path,
    text: Path,
    workdir: Path,
    *extra: str,
) -> dict[str, float]:
    """Run llama-perplexity's two passes (base logits file, then --kl-divergence)."""
    kld_file = workdir / f"{base.stem}-{'-'.join(extra) or 'default'}.kld"
    exe = str(llama_bin / "llama-perplexity")
    common = ["-c", str(N_CTX), "-t", "1", *extra]
    if not kld_file.exists():
        r = subprocess.run(
            [
                exe,
                "-m",
                str(base),
                "-f",
                str(text),
                "--chunks",
                str(CHUNKS),
                *common,
                "--kl-divergence-base",
                str(kld_file),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr[-3000:]
    # in case the final statistics were lost anyway (see flush_logs_env): run it again
    for _ in range(5):
        r = subprocess.run(
            [
                exe,
                "-m",
                str(quant),
                *common,
                "--kl-divergence-base",
                str(kld_file),
                "--kl-divergence",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        out = r.stdout + r.stderr
        if "Same top p" in out:
            break
    return {
        "ppl": _num(out, "Mean PPL(Q)"),
        "ppl_base": _num(out, "Mean PPL(base)"),
        "kld_mean": _num(out, "Mean    KLD"),
        "kld_max": _num(out, "Maximum KLD"),
        "kld_p99": _num(out, "99.0%   KLD"),
        "kld_median": _num(out, "Median  KLD"),
        "same_top_p": _num(out, "Same top p") / 100,
        "mean_dp": _num(out, "Mean    Δp") / 100,
        "rms_dp": _num(out, "RMS Δp    ") / 100,
    }


@pytest.mark.parametrize("qtype", ["Q2_K", "Q6_K"])
def test_llama_method_equals_llama_perplexity(
    qtype, llama_bin, tiny_model, quants, calib_text, tmp_path_factory, flush_logs_env
):
    quant = quants[_kind(tiny_model)][qtype]
    ref = llama_perplexity_kld(
        flush_logs_env,
        llama_bin,
        tiny_model,
        quant,
        calib_text,
        tmp_path_factory.mktemp("kld"),
        "-b",
        str(N_CTX),
    )
    df = evaluate(
        tiny_model, [quant], calib_text, n_ctx=N_CTX, chunks=CHUNKS, threads=1, kld_method="llama"
    )
    base, q = df.iloc[0], df.iloc[1]
    assert q["n_tokens"] == CHUNKS * (N_CTX - 1 - N_CTX // 2)
    # llama-perplexity prints 6 decimals (KLD, PPL) or 3 decimals of a percentage (Δp, top)
    assert q["ppl"] == pytest.approx(ref["ppl"], rel=2e-6)
    assert base["ppl"] == pytest.approx(ref["ppl_base"], rel=2e-6)
    for k in ("kld_mean", "kld_median", "kld_p99", "kld_max"):
        assert q[k] == pytest.approx(ref[k], rel=1e-4, abs=2e-6), k
    assert q["same_top_p"] == pytest.approx(ref["same_top_p"], abs=1e-5)
    assert q["mean_dp"] == pytest.approx(ref["mean_dp"], abs=1e-5)
    assert q["rms_dp"] == pytest.approx(ref["rms_dp"], abs=1e-5)
    assert q["kld_mean"] > (1e-2 if qtype == "Q2_K" else 1e-4)  # a real divergence


def test_exact_method_within_one_percent(
    llama_bin, tiny_model, quants, calib_text, tmp_path_factory, flush_logs_env
):
    """The default method against llama-perplexity run with its own defaults."""
    quant = quants[_kind(tiny_model)]["Q2_K"]
    ref = llama_perplexity_kld(
        flush_logs_env, llama_bin, tiny_model, quant, calib_text, tmp_path_factory.mktemp("kld")
    )
    df = evaluate(tiny_model, [quant], calib_text, n_ctx=N_CTX, chunks=CHUNKS, threads=1)
    q = df.iloc[1]
    for k in ("ppl", "kld_mean", "kld_median", "kld_p99", "same_top_p"):
        assert q[k] == pytest.approx(ref[k], rel=0.01, abs=1e-4), k
    assert df.iloc[0]["ppl"] == pytest.approx(ref["ppl_base"], rel=0.01)


def test_many_quants_at_once_equal_one_at_a_time(dense_model, quants, calib_text):
    q2, q6 = quants["dense"]["Q2_K"], quants["dense"]["Q6_K"]
    both = evaluate(dense_model, [q2, q6], calib_text, n_ctx=N_CTX, chunks=4, threads=1)
    alone = evaluate(dense_model, [q6], calib_text, n_ctx=N_CTX, chunks=4, threads=1)
    assert list(both["model"]) == ["tiny-dense", "dense-Q2_K", "dense-Q6_K"]
    pd.testing.assert_series_equal(
        both.iloc[2].drop("path"), alone.iloc[1].drop("path"), check_names=False
    )
    assert both.iloc[1]["kld_mean"] > 10 * both.iloc[2]["kld_mean"] > 0


def test_block_size_does_not_change_results(dense_model, quants, calib_text):
    """Smaller blocks (less memory) give the same figures up to the rounding differences
    of llama.cpp's kernels between batch sizes (up to 2 % of a logit on these random
    Q2_K weights; llama-perplexity's own results move as much with its -b)."""
    q = quants["dense"]["Q2_K"]
    whole = evaluate(dense_model, [q], calib_text, n_ctx=N_CTX, chunks=3, threads=1)
    blocks = evaluate(dense_model, [q], calib_text, n_ctx=N_CTX, chunks=3, threads=1, rows=5)
    for k in ("ppl", "kld_mean", "kld_max", "mean_dp"):
        assert blocks.iloc[1][k] == pytest.approx(whole.iloc[1][k], rel=1e-2, abs=1e-4), k
    # near-ties of the top token on random weights: a few of the 189 tokens may flip
    assert blocks.iloc[1]["same_top_p"] == pytest.approx(whole.iloc[1]["same_top_p"], abs=0.02)


def test_summary_facts(dense_model, quants, calib_text, tmp_path):
    """Type and imatrix use come from the files' metadata; size and bpw from the files."""
    im = _imatrix(tmp_path / "im.gguf", ["blk.0.ffn_up.weight"])
    qi = quantize(dense_model, tmp_path / "with-im.gguf", "Q4_K_M", imatrix=str(im))
    df = evaluate(
        dense_model, [qi, quants["dense"]["Q6_K"]], calib_text, n_ctx=N_CTX, chunks=2, threads=1
    )
    assert list(df.columns) == SUMMARY_COLUMNS
    assert list(df["type"]) == ["F16", "Q4_K_M", "Q6_K"]
    assert list(df["imatrix"]) == [False, True, False]
    assert list(df["is_base"]) == [True, False, False]
    assert df.iloc[1]["imatrix_file"] == str(im)
    assert df.iloc[1]["file_size"] == qi.stat().st_size
    assert 4.0 < df.iloc[1]["bpw"] < 6.0 and 15.9 < df.iloc[0]["bpw"] < 16.1
    assert df.iloc[0]["kld_mean"] == 0 and df.iloc[0]["same_top_p"] == 1


def _imatrix(path: Path, names: list[str]) -> Path:
    from imatrix.formats import write_imatrix
    from imatrix.model import Entry, ImatrixData

    entries = {n: Entry(np.full(256, 2.0), np.array([4.0])) for n in names}
    write_imatrix(ImatrixData(entries=entries, datasets=["d"], chunk_count=1), path, compat=True)
    return path


def test_imatrix_entries_inherited_from_the_base_do_not_count(dense_model, calib_text, tmp_path):
    """A base requantized from an imatrix quant carries quantize.imatrix.* entries, and
    llama.cpp copies them into every quant made from it, with or without an imatrix."""
    im = str(_imatrix(tmp_path / "im.gguf", ["blk.0.ffn_up.weight", "blk.0.attn_k.weight"]))
    base = quantize(dense_model, tmp_path / "base-q8.gguf", "Q8_0", imatrix=im)
    plain = quantize(base, tmp_path / "plain.gguf", "Q4_K_M", allow_requantize=True)
    with_im = quantize(
        base,
        tmp_path / "with.gguf",
        "Q4_K_M",
        allow_requantize=True,
        imatrix=im,
        exclude_weights=["attn_k"],
    )
    df = evaluate(base, [plain, with_im], calib_text, n_ctx=N_CTX, chunks=2, threads=1)
    assert list(df["imatrix"]) == [False, False, True]
    assert df.iloc[1]["imatrix_file"] == im  # inherited, and recorded as found


def test_write_and_merge_summaries(dense_model, quants, calib_text, tmp_path):
    a = evaluate(
        dense_model, [quants["dense"]["Q6_K"]], calib_text, n_ctx=N_CTX, chunks=2, threads=1
    )
    b = evaluate(
        dense_model, [quants["dense"]["Q2_K"]], calib_text, n_ctx=N_CTX, chunks=2, threads=1
    )
    pa, pb = write_summary(a, tmp_path / "a.parquet"), write_summary(b, tmp_path / "b.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(pa), a)
    merged = merge_summaries([pa, pb], tmp_path / "all.parquet")
    assert list(merged["type"]) == ["F16", "Q2_K", "Q6_K"]  # base once, then by bpw
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "all.parquet"), merged)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "all.parquet", "b.parquet"]


def test_default_rows_bound_memory():
    assert default_rows(262144, 255) == 32  # 32 MiB per buffer for gemma's vocabulary
    assert default_rows(557, 63) == 63
    assert default_rows(10**7, 255) == 1


def _other_vocab_model(src: Path, dst: Path) -> Path:
    """The same model with one token fewer (embedding and output rows cut too)."""
    import gguf

    g = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "llama")
    for field in g.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        val = field.contents()
        if field.name in (
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.scores",
            "tokenizer.ggml.token_type",
        ):
            val = val[:-1]
        if field.name == "llama.vocab_size":
            val = val - 1
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(field.name, val, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(field.name, val, vtype)
    for t in g.tensors:
        data = np.array(t.data)
        if t.name in ("token_embd.weight", "output.weight"):
            data = data[:-1]
        w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_user_errors(dense_model, quants, calib_text, tmp_path):
    q = quants["dense"]["Q6_K"]
    short = tmp_path / "short.txt"
    short.write_text("the old house stood at the end of the long road")
    with pytest.raises(
        ImatrixError, match=r"short.txt: tokenizes to only \d+ tokens; at least 256"
    ):
        evaluate(dense_model, [q], short, n_ctx=N_CTX)
    with pytest.raises(ImatrixError, match="no such model file"):
        evaluate(dense_model, [tmp_path / "nope.gguf"], calib_text, n_ctx=N_CTX)
    with pytest.raises(ImatrixError, match="no such text file"):
        evaluate(dense_model, [q], tmp_path / "nope.txt", n_ctx=N_CTX)
    other = _other_vocab_model(dense_model, tmp_path / "other.gguf")
    with pytest.raises(ImatrixError, match=r"other.gguf: vocabulary of 556 tokens differs"):
        evaluate(dense_model, [other], calib_text, n_ctx=N_CTX, chunks=2)
    with pytest.raises(ImatrixError, match="at least one quantized model"):
        evaluate(dense_model, [], calib_text)
    with pytest.raises(ImatrixError, match="unknown KLD method"):
        evaluate(dense_model, [q], calib_text, kld_method="fast")


def test_cli(dense_model, quants, calib_text, tmp_path, capsys):
    from imatrix.cli import main

    q2, q6 = quants["dense"]["Q2_K"], quants["dense"]["Q6_K"]
    out = tmp_path / "s.parquet"
    argv = [
        "evaluate",
        str(dense_model),
        str(q2),
        str(q6),
        "-f",
        str(calib_text),
        "-c",
        str(N_CTX),
        "--chunks",
        "2",
        "-t",
        "1",
        "-o",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:3] == ["model", "type", "imatrix"]
    assert [ln.split()[0] for ln in printed[1:]] == ["tiny-dense", "dense-Q2_K", "dense-Q6_K"]
    assert list(pd.read_parquet(out)["type"]) == ["F16", "Q2_K", "Q6_K"]
    assert main(["evaluate", str(dense_model), str(q2), "-f", str(tmp_path / "x.txt")]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("I ")]
    assert err == [f"imatrix evaluate: error: {tmp_path / 'x.txt'}: no such text file"]
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(dense_model), "-f", str(calib_text)])
    assert exc.value.code == 2
