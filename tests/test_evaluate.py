"""Evaluation parity: our PPL, KLD and top-token agreement against llama-perplexity's.

Two comparisons with the real llama-perplexity (built from the pinned source), on the
tiny dense and MoE models and quants made from them:

- ``kld_method="llama"`` compares against the base's log-probabilities exactly as
  llama-perplexity stores them (uint16, cut at -16); with llama-perplexity run on the
  same batch layout (``-b n_ctx``: one sequence per batch, as we decode) every
  statistic agrees to float rounding. This pins down the tokens, chunks, BOS
  handling, scored positions and formulas.
- the default exact method against llama-perplexity on the same batch layout: equal to
  the method's own difference (1e-4 relative); and with llama-perplexity's default
  batches, within bounds set from measured batch-layout rounding (see each test).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import imatrix.evaluate as ev
from imatrix.errors import ImatrixError
from imatrix.evaluate import (
    SUMMARY_COLUMNS,
    chunk_ci,
    default_rows,
    evaluate,
    merge_summaries,
    write_summary,
)
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


def test_exact_method_equals_llama_perplexity_on_the_same_batches(
    llama_bin, tiny_model, quants, calib_text, tmp_path_factory, flush_logs_env
):
    """The default method against llama-perplexity decoding the same batches as we do
    (``-b n_ctx``): what remains is the method's own difference (the base's exact
    float32 log-probabilities instead of uint16 steps cut at -16). Measured: PPL to 1e-8,
    the base's PPL to 1.3e-6, every KLD figure to 2.3e-5 relative, top token and Δp to
    llama-perplexity's printed precision; the bounds are about 4x that."""
    quant = quants[_kind(tiny_model)]["Q2_K"]
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
    df = evaluate(tiny_model, [quant], calib_text, n_ctx=N_CTX, chunks=CHUNKS, threads=1)
    q = df.iloc[1]
    assert q["ppl"] == pytest.approx(ref["ppl"], rel=2e-6)
    assert df.iloc[0]["ppl"] == pytest.approx(ref["ppl_base"], rel=5e-6)
    for k in ("kld_mean", "kld_median", "kld_p99", "kld_max"):
        assert q[k] == pytest.approx(ref[k], rel=1e-4, abs=2e-6), k
    for k in ("same_top_p", "mean_dp", "rms_dp"):
        assert q[k] == pytest.approx(ref[k], abs=1e-5), k


def test_exact_method_against_llama_perplexity_defaults(
    llama_bin, tiny_model, quants, calib_text, tmp_path_factory, flush_logs_env
):
    """The default method against llama-perplexity with its own defaults, which decode
    four 128-token chunks per batch: llama.cpp's kernels round differently for that
    batch layout, and both KLD methods move alike (the test above isolates the method).
    Measured on these models: PPL 2e-4 relative, the base's 4e-5, KLD mean 2e-4; the
    bounds are 5-10x that. The median and the 99th percentile are order statistics of a
    few hundred per-token values that each move with the rounding (measured up to 0.25 %
    and 0.73 %), so 1 % is their bound; the top token flips on one or two near-ties
    (1 of 252 tokens, 2 of 756), so its bound is 0.01 absolute."""
    quant = quants[_kind(tiny_model)]["Q2_K"]
    ref = llama_perplexity_kld(
        flush_logs_env, llama_bin, tiny_model, quant, calib_text, tmp_path_factory.mktemp("kld")
    )
    df = evaluate(tiny_model, [quant], calib_text, n_ctx=N_CTX, chunks=CHUNKS, threads=1)
    q = df.iloc[1]
    assert q["ppl"] == pytest.approx(ref["ppl"], rel=1e-3)
    assert df.iloc[0]["ppl"] == pytest.approx(ref["ppl_base"], rel=2e-4)
    assert q["kld_mean"] == pytest.approx(ref["kld_mean"], rel=2e-3)
    for k in ("kld_median", "kld_p99"):
        assert q[k] == pytest.approx(ref[k], rel=0.01, abs=1e-4), k
    assert q["same_top_p"] == pytest.approx(ref["same_top_p"], abs=0.01)


def test_many_quants_at_once_equal_one_at_a_time(dense_model, quants, calib_text):
    q2, q6 = quants["dense"]["Q2_K"], quants["dense"]["Q6_K"]
    both = evaluate(dense_model, [q2, q6], calib_text, n_ctx=N_CTX, chunks=4, threads=1)
    alone = evaluate(dense_model, [q6], calib_text, n_ctx=N_CTX, chunks=4, threads=1)
    assert list(both["model"]) == ["tiny-dense", "dense-Q2_K", "dense-Q6_K"]
    pd.testing.assert_series_equal(
        both.iloc[2].drop("path"), alone.iloc[1].drop("path"), check_names=False
    )
    assert both.iloc[1]["kld_mean"] > 10 * both.iloc[2]["kld_mean"] > 0


#: How far block-wise figures (``rows=5``) may be from whole-chunk ones (relative):
#: llama.cpp's kernels round differently for different batch sizes. Measured on these
#: random Q2_K weights: the quant's PPL moves by up to 0.25 %, the KLD mean by 0.15 %,
#: its maximum by 0.6 %; the F16 base's PPL by 0.015 %. The bounds leave room for other
#: CPUs' kernels, and stay far below what a token dropped or repeated at a block
#: boundary does to the PPL (5-30 %; see the test below). The KLD cannot show such a
#: fault (both models read the same wrong tokens and still agree), so the PPLs are the
#: figures that must stay tight.
BLOCK_TOL = {"ppl": 1e-2, "kld_mean": 5e-3, "kld_max": 2e-2, "mean_dp": 1e-2}
BLOCK_TOL_BASE_PPL = 1e-3
#: near-ties of the top token on random weights: a few of the 189 tokens may flip
BLOCK_TOL_TOP = 0.02


def _block_mismatches(whole: pd.DataFrame, blocks: pd.DataFrame) -> list[str]:
    """The figures of ``blocks`` outside the tolerances around ``whole``."""
    bad = [
        k
        for k, rel in BLOCK_TOL.items()
        if blocks.iloc[1][k] != pytest.approx(whole.iloc[1][k], rel=rel, abs=1e-4)
    ]
    if blocks.iloc[0]["ppl"] != pytest.approx(whole.iloc[0]["ppl"], rel=BLOCK_TOL_BASE_PPL):
        bad.append("base ppl")
    if blocks.iloc[1]["same_top_p"] != pytest.approx(
        whole.iloc[1]["same_top_p"], abs=BLOCK_TOL_TOP
    ):
        bad.append("same_top_p")
    return bad


def test_block_size_does_not_change_results(dense_model, quants, calib_text):
    """Smaller blocks (less memory) give the same figures up to rounding."""
    q = quants["dense"]["Q2_K"]
    whole = evaluate(dense_model, [q], calib_text, n_ctx=N_CTX, chunks=3, threads=1)
    blocks = evaluate(dense_model, [q], calib_text, n_ctx=N_CTX, chunks=3, threads=1, rows=5)
    assert _block_mismatches(whole, blocks) == []


@pytest.mark.parametrize("fault", ["drop", "duplicate"])
def test_token_dropped_or_duplicated_at_block_boundary_is_caught(
    dense_model, quants, calib_text, monkeypatch, fault
):
    """The tolerances above are tight enough to catch an off-by-one at a block boundary:
    the window fed to the models loses (or repeats) the token at the first position of
    the second block, positions staying consecutive (so llama.cpp cannot notice)."""
    q = quants["dense"]["Q2_K"]
    whole = evaluate(dense_model, [q], calib_text, n_ctx=N_CTX, chunks=3, threads=1)
    real = ev.evaluate_chunk

    def faulty(decoders, work, plan, window, targets):
        b = plan.first + plan.rows
        if fault == "drop":
            window = np.concatenate([window[:b], window[b + 1 :], window[-1:]])
        else:
            window = np.concatenate([window[: b + 1], window[b:-1]])
        real(decoders, work, plan, window, targets)

    monkeypatch.setattr(ev, "evaluate_chunk", faulty)
    broken = evaluate(dense_model, [q], calib_text, n_ctx=N_CTX, chunks=3, threads=1, rows=5)
    assert {"ppl", "base ppl"} <= set(_block_mismatches(whole, broken))


def test_summary_facts(dense_model, quants, calib_text, tmp_path):
    """Type and imatrix use come from the files' metadata; size and bpw from the files."""
    im = _imatrix(tmp_path / "im.gguf", ["blk.0.ffn_up.weight"])
    qi = quantize(dense_model, tmp_path / "with-im.gguf", "Q4_K_M", imatrix=str(im))
    df = evaluate(
        dense_model,
        [qi, quants["dense"]["Q6_K"]],
        calib_text,
        n_ctx=N_CTX,
        chunks=2,
        threads=1,
        recipes={str(qi): "my-mix"},
    )
    assert list(df.columns) == SUMMARY_COLUMNS
    assert list(df["type"]) == ["F16", "Q4_K_M", "Q6_K"]
    assert df["recipe"].fillna("").tolist() == ["", "my-mix", ""]  # null for stock types
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
    # a summary from before the confidence interval existed still merges (NaN there)
    b.drop(columns=["kld_ci_low", "kld_ci_high"]).to_parquet(pb)
    old = merge_summaries([pa, pb])
    assert old["kld_ci_low"].isna().tolist() == [False, True, False]  # base, Q2_K (b), Q6_K
    # and one from before evaluation sets: it was on the one (default) set
    assert merged["eval_set"].tolist() == ["default"] * 3
    b.drop(columns=["eval_set"]).to_parquet(pb)
    assert merge_summaries([pa, pb])["eval_set"].tolist() == ["default"] * 3


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
        "--eval-set",
        "web",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:3] == ["model", "type", "imatrix"]
    assert [ln.split()[0] for ln in printed[1:]] == ["tiny-dense", "dense-Q2_K", "dense-Q6_K"]
    assert list(pd.read_parquet(out)["type"]) == ["F16", "Q2_K", "Q6_K"]
    assert list(pd.read_parquet(out)["eval_set"]) == ["web"] * 3
    assert main(["evaluate", str(dense_model), str(q2), "-f", str(tmp_path / "x.txt")]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("I ")]
    assert err == [f"imatrix evaluate: error: {tmp_path / 'x.txt'}: no such text file"]
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(dense_model), "-f", str(calib_text)])
    assert exc.value.code == 2


def test_cli_json_is_strict(dense_model, quants, calib_text, capsys):
    """The base has no imatrix file (a missing value, NaN in pandas): null, not NaN."""
    from test_json_output import strict_loads

    from imatrix.cli import main

    argv = ["evaluate", str(dense_model), str(quants["dense"]["Q6_K"]), "-f", str(calib_text)]
    assert main([*argv, "-c", str(N_CTX), "--chunks", "1", "-t", "1", "--json"]) == 0
    rows = strict_loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["tiny-dense", "dense-Q6_K"]
    assert rows[0]["imatrix_file"] is None
    # one chunk: no standard error of the per-chunk means, so no interval
    assert rows[1]["kld_ci_low"] is None and rows[1]["kld_ci_high"] is None
    assert set(rows[0]) == set(SUMMARY_COLUMNS)


def test_chunk_ci_formula():
    m = [0.1, 0.3, 0.2, 0.4]
    se = np.std(m, ddof=1) / 2
    low, high = chunk_ci(0.25, m)
    assert low == pytest.approx(0.25 - 1.96 * se) and high == pytest.approx(0.25 + 1.96 * se)
    assert all(np.isnan(chunk_ci(0.1, [0.1])))
    assert chunk_ci(0.2, [0.2, 0.2]) == (0.2, 0.2)


def test_kld_ci_from_independent_chunk_means(dense_model, quants, calib_text):
    """The interval is kld_mean ± 1.96 standard errors of the per-chunk mean KLDs; each
    chunk's mean is recovered here from runs over the first k chunks (every chunk
    scores as many tokens, and a chunk's figures do not depend on the others)."""
    q = quants["dense"]["Q2_K"]
    runs = [
        evaluate(dense_model, [q], calib_text, n_ctx=N_CTX, chunks=k, threads=1).iloc[1]
        for k in (1, 2, 3, 4)
    ]
    totals = [0.0] + [r["kld_mean"] * (k + 1) for k, r in enumerate(runs)]
    chunk_means = np.diff(totals)
    last = runs[-1]
    se = np.std(chunk_means, ddof=1) / np.sqrt(4)
    assert last["kld_ci_low"] == pytest.approx(last["kld_mean"] - 1.96 * se, rel=1e-9)
    assert last["kld_ci_high"] == pytest.approx(last["kld_mean"] + 1.96 * se, rel=1e-9)
    assert last["kld_ci_low"] < last["kld_mean"] < last["kld_ci_high"]
    assert last["kld_err"] > 0  # llama-perplexity's per-token figure, kept beside it
    base = evaluate(dense_model, [q], calib_text, n_ctx=N_CTX, chunks=2, threads=1).iloc[0]
    assert (base["kld_ci_low"], base["kld_ci_high"]) == (0.0, 0.0)
