"""The collector library: early graph stop, resume, chunk ranges, provenance, layout guard.

Parity with llama-imatrix itself is in test_collect.py; here the reference for the
activation sums is an independent numpy computation of the first layer's input.
"""

from __future__ import annotations

import numpy as np
import pytest

from imatrix import ggml
from imatrix.collect import CollectSettings, checkpoint_path, collect
from imatrix.errors import ImatrixError
from imatrix.formats import read_imatrix
from imatrix.llama_api import load_model
from imatrix.model import Provenance
from imatrix.tokenize import tokenize_file, tokenize_text


@pytest.fixture
def tokens(tiny_model, calib_text, tmp_path):
    out = tmp_path / "calib.npy"
    tokenize_file(tiny_model, calib_text, out)
    return out


def _same_entries(a, b) -> None:
    assert set(a.entries) == set(b.entries)
    for n in a.entries:
        np.testing.assert_array_equal(a.entries[n].values, b.entries[n].values, err_msg=n)
        np.testing.assert_array_equal(a.entries[n].sums, b.entries[n].sums, err_msg=n)
        np.testing.assert_array_equal(a.entries[n].counts, b.entries[n].counts, err_msg=n)


@pytest.mark.parametrize("n_batch", [512, 64])
def test_early_stop_gives_identical_data(tiny_model, tokens, n_batch):
    """Cutting graphs after the last needed tensor changes nothing (several sequences per
    batch, and one sequence in two decodes per chunk)."""
    kw = dict(n_ctx=128, n_batch=n_batch, last_chunk=8, compute_ppl=False, threads=2)
    cut = collect(tiny_model, tokens, None, CollectSettings(**kw))
    full = collect(tiny_model, tokens, None, CollectSettings(stop_early=False, **kw))
    assert cut.stopped_early and not full.stopped_early
    _same_entries(cut.data, full.data)


@pytest.mark.parametrize(
    ("n_ctx", "n_batch", "n_ubatch", "chunks", "aborted"),
    [
        (128, 512, 512, 8, 2),  # a group is one ubatch, as llama-imatrix decodes it
        (256, 512, 256, 8, 8),  # one chunk per decode; llama-imatrix: 2 x 128 rows
        (512, 2048, 512, 4, 4),  # the defaults: one chunk per decode; 4 x 128 rows
        (128, 512, 128, 8, 0),  # llama-imatrix's 4 x 32 rows take another attention kernel
        (256, 512, 128, 8, 0),  # a chunk spans two ubatches: an abort would drop its cache
    ],
)
def test_aborted_decodes_give_the_same_sums(
    tiny_model, tokens, n_ctx, n_batch, n_ubatch, chunks, aborted, caplog
):
    """Where a ubatch holds whole chunks and the attention kernel is the one
    llama-imatrix's ubatches take, each decode is aborted right after the last needed
    tensor (no logits copied). The activations are those of full graphs decoded side by
    side; only float64 sums over other row groups may round differently. None of
    llama.cpp's lines about the abort reach the log."""
    import logging

    kw = dict(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, last_chunk=chunks)
    caplog.set_level(logging.DEBUG)
    cut = collect(tiny_model, tokens, None, CollectSettings(compute_ppl=False, **kw))
    about_abort = ("failed to decode", "removing memory", "failed to compute", "compute_async")
    noise = [
        r.getMessage() for r in caplog.records if any(w in r.getMessage() for w in about_abort)
    ]
    full = collect(
        tiny_model, tokens, None, CollectSettings(compute_ppl=False, stop_early=False, **kw)
    )
    assert cut.stopped_early and not full.stopped_early
    assert (cut.aborted_decodes, full.aborted_decodes, noise) == (aborted, 0, [])
    assert set(cut.data.entries) == set(full.data.entries)
    for n, e in cut.data.entries.items():
        f = full.data.entries[n]
        np.testing.assert_array_equal(e.counts, f.counts, err_msg=n)
        np.testing.assert_allclose(e.values, f.values, rtol=1e-12, atol=0, err_msg=n)
        np.testing.assert_allclose(e.sums, f.sums, rtol=1e-12, atol=1e-12, err_msg=n)


@pytest.mark.parametrize(
    ("n_batch", "chunks"),
    [
        (1024, 8),  # 8 sequences, 2 ubatches of 8 x 64 rows
        (2048, 5),  # 5 sequences: ubatches of 5 x 102 and 5 x 26 rows
    ],
)
def test_batches_in_ubatch_order_give_the_same_bytes(
    tiny_model, tokens, monkeypatch, n_batch, chunks
):
    """Side-by-side chunks go to llama.cpp in the order it computes them, so reading
    the logits needs no reordering; the ubatches are the same, so are the bytes."""
    from imatrix.collect.plan import ChunkPlan

    kw = dict(n_ctx=128, n_batch=n_batch, last_chunk=chunks, compute_ppl=True, threads=2)
    ours = collect(tiny_model, tokens, None, CollectSettings(**kw))
    monkeypatch.setattr(ChunkPlan, "interleave", staticmethod(lambda spec, n_ubatch: spec))
    plain = collect(tiny_model, tokens, None, CollectSettings(**kw))
    _same_entries(ours.data, plain.data)
    assert ours.perplexity.running == plain.perplexity.running


def test_gpu_layers_path_gives_identical_data(tiny_model, tokens):
    """-ngl goes through the same callback (on a CPU-only build it offloads nothing)."""
    kw = dict(n_ctx=128, n_batch=256, last_chunk=4, compute_ppl=False, threads=2)
    a = collect(tiny_model, tokens, None, CollectSettings(n_gpu_layers=99, **kw))
    b = collect(tiny_model, tokens, None, CollectSettings(n_gpu_layers=0, stop_early=False, **kw))
    _same_entries(a.data, b.data)


def test_perplexity_or_output_disable_the_early_stop(dense_model, calib_text, tmp_path):
    toks = tmp_path / "t.npy"
    tokenize_file(dense_model, calib_text, toks)
    kw = dict(n_ctx=128, last_chunk=2, threads=2)
    assert not collect(
        dense_model, toks, None, CollectSettings(compute_ppl=True, **kw)
    ).stopped_early
    r = collect(
        dense_model, toks, None, CollectSettings(compute_ppl=False, process_output=True, **kw)
    )
    assert not r.stopped_early
    assert "output.weight" in r.data.entries


def test_first_layer_sums_match_numpy(dense_model, calib_text, tmp_path):
    """in_sum2 and in_sum of blk.0.attn_q (RMS-normed embeddings) against numpy."""
    import gguf

    toks = tmp_path / "t.npy"
    tokenize_file(dense_model, calib_text, toks)
    n_ctx, first, last = 128, 2, 7
    res = collect(
        dense_model,
        toks,
        None,
        CollectSettings(n_ctx=n_ctx, first_chunk=first, last_chunk=last, compute_ppl=False),
    )
    r = gguf.GGUFReader(dense_model)
    w = {t.name: np.asarray(t.data) for t in r.tensors}
    emb = w["token_embd.weight"].astype(np.float64)
    norm = w["blk.0.attn_norm.weight"].astype(np.float64)
    ids = np.load(toks)[first * n_ctx : last * n_ctx].reshape(-1, n_ctx).copy()
    ids[:, 0] = 1  # BOS replaces each chunk's first token
    x = emb[ids.reshape(-1)]
    x = x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + 1e-5) * norm
    e = res.data.entries["blk.0.attn_q.weight"]
    np.testing.assert_allclose(e.values, (x * x).sum(0), rtol=2e-5)
    np.testing.assert_allclose(e.sums, x.sum(0), rtol=1e-4, atol=1e-3)
    assert e.counts.tolist() == [ids.size]


def test_moe_counts_cover_every_routed_token(moe_model, calib_text, tmp_path):
    toks = tmp_path / "t.npy"
    tokenize_file(moe_model, calib_text, toks)
    res = collect(
        moe_model, toks, None, CollectSettings(n_ctx=128, last_chunk=5, compute_ppl=False)
    )
    for name, e in res.data.entries.items():
        if "_exps" in name:
            assert e.n_counts == 4
            assert e.counts.sum() == 5 * 128 * 2  # 2 experts used per token
        else:
            assert e.counts.tolist() == [5 * 128]
    assert res.data.chunk_count == 5 and res.data.chunk_size == 128


class _Stop(Exception):
    pass


@pytest.mark.parametrize("ppl", [True, False])
def test_resume_equals_uninterrupted_run(tiny_model, tokens, tmp_path, ppl):
    kw = dict(
        n_ctx=128,
        n_batch=256,
        first_chunk=1,
        last_chunk=13,
        output_frequency=4,
        compute_ppl=ppl,
        threads=2,
    )
    whole = tmp_path / "whole.gguf"
    ref = collect(tiny_model, tokens, whole, CollectSettings(**kw), dataset="calib")
    assert not checkpoint_path(whole).exists()

    out = tmp_path / "out.gguf"

    def interrupt(k: int, _ppl: float | None) -> None:
        if k == 10:
            raise _Stop

    with pytest.raises(_Stop):
        collect(tiny_model, tokens, out, CollectSettings(**kw), dataset="calib", on_chunk=interrupt)
    ck = checkpoint_path(out)
    assert ck.exists() and not out.exists()
    partial = read_imatrix(ck)
    assert partial.provenance.chunk_reached == 9  # checkpoints after 4 and 8 chunks
    assert partial.chunk_count == 8

    seen: list[int] = []
    res = collect(
        tiny_model,
        tokens,
        out,
        CollectSettings(resume=True, **kw),
        dataset="calib",
        on_chunk=lambda k, p: seen.append(k),
    )
    assert res.resumed_from == 9 and seen == [9, 10, 11, 12]
    assert out.read_bytes() == whole.read_bytes()
    assert not ck.exists()
    if ppl:
        assert res.perplexity.running == ref.perplexity.running
        assert res.perplexity.ppl == ref.perplexity.ppl


#: a run that writes a checkpoint every 2 chunks, stopped by :func:`_stopped_run`
_RESUMABLE = dict(n_ctx=128, last_chunk=6, output_frequency=2, compute_ppl=False, n_batch=128)


def _stopped_run(model, calib_text, tmp_path, **extra):
    """Tokens and output of a collection (``_RESUMABLE`` and ``extra``) stopped after
    chunk 4: its checkpoint is left."""
    toks = tmp_path / "t.npy"
    tokenize_file(model, calib_text, toks)
    out = tmp_path / "o.gguf"

    def interrupt(k: int, _p: float | None) -> None:
        if k == 4:
            raise _Stop

    with pytest.raises(_Stop):
        collect(model, toks, out, CollectSettings(**_RESUMABLE, **extra), on_chunk=interrupt)
    return toks, out


def test_resume_refuses_a_checkpoint_of_other_settings(dense_model, calib_text, tmp_path):
    toks, out = _stopped_run(dense_model, calib_text, tmp_path)
    kw = _RESUMABLE
    with pytest.raises(ImatrixError, match=r"different settings.*last_chunk"):
        collect(dense_model, toks, out, CollectSettings(resume=True, **{**kw, "last_chunk": 5}))
    # without resume the checkpoint is ignored and replaced by the finished output
    res = collect(dense_model, toks, out, CollectSettings(**kw))
    assert res.resumed_from is None and out.exists() and not checkpoint_path(out).exists()
    assert read_imatrix(out).chunk_count == 6


def test_resume_refuses_a_checkpoint_without_plain_sums(dense_model, calib_text, tmp_path):
    """A run for llama-imatrix's formats keeps no plain sums: its checkpoint, resumed
    for our format, would give partial ones, so the resume is refused."""
    toks, out = _stopped_run(dense_model, calib_text, tmp_path, compat=True)
    kw = _RESUMABLE
    with pytest.raises(ImatrixError, match=r"different settings \(activation_sums\)"):
        collect(dense_model, toks, out, CollectSettings(resume=True, **kw))
    res = collect(dense_model, toks, out, CollectSettings(resume=True, compat=True, **kw))
    assert res.resumed_from == 4


@pytest.mark.parametrize(("fmt", "compat"), [("gguf", True), ("dat", False)])
def test_outputs_without_plain_sums_do_not_compute_them(tiny_model, tokens, tmp_path, fmt, compat):
    """llama-imatrix's formats cannot store ``in_sum``: a collection for them skips the
    plain sums (a second pass over every activation), and its file is byte for byte the
    one written from a collection that computed them."""
    from imatrix.formats import write_imatrix

    kw = dict(n_ctx=128, n_batch=512, last_chunk=6, compute_ppl=False)
    out = tmp_path / f"o.{fmt}"
    lean = collect(tiny_model, tokens, out, CollectSettings(output_format=fmt, compat=compat, **kw))
    assert lean.data.entries and all(e.sums is None for e in lean.data.entries.values())
    full = collect(tiny_model, tokens, None, CollectSettings(**kw))
    assert full.data.has_sums
    ref = tmp_path / f"ref.{fmt}"
    write_imatrix(full.data, ref, output_format=fmt, compat=compat)
    assert out.read_bytes() == ref.read_bytes()


def test_chunk_range_is_checked(dense_model, calib_text, tmp_path):
    toks = tmp_path / "t.npy"
    tokenize_file(dense_model, calib_text, toks)
    n = np.load(toks).size // 128
    for first, last in ((0, n + 1), (3, 3), (-1, 2)):
        with pytest.raises(ImatrixError, match="chunk range"):
            collect(
                dense_model,
                toks,
                None,
                CollectSettings(n_ctx=128, first_chunk=first, last_chunk=last),
            )
    # the library takes any valid range, also a single last chunk (no 2-chunk minimum)
    r = collect(
        dense_model,
        toks,
        None,
        CollectSettings(n_ctx=128, first_chunk=n - 1, last_chunk=n, compute_ppl=True),
    )
    assert r.data.chunk_count == 1 and len(r.perplexity.running) == 1


def test_tokens_array_and_file_agree_and_name_the_dataset(dense_model, calib_text, tmp_path):
    toks = tmp_path / "t.npy"
    rec = tokenize_file(dense_model, calib_text, toks)
    settings = CollectSettings(n_ctx=128, last_chunk=3, compute_ppl=False)
    from_file = collect(dense_model, toks, None, settings)
    arr = np.load(toks)
    from_arr = collect(
        dense_model,
        arr,
        None,
        settings,
        dataset="mine",
        provenance=Provenance(model_sha256="ab" * 32),
    )
    _same_entries(from_file.data, from_arr.data)
    # a tokens file names its text and carries its provenance
    assert from_file.data.datasets == [str(calib_text)]
    assert from_file.data.provenance.model_sha256 == rec["model_sha256"]
    assert from_file.data.provenance.dataset_sha256 == [rec["text_sha256"]]
    assert from_arr.data.datasets == ["mine"]
    assert from_arr.data.provenance.model_sha256 == "ab" * 32


def test_save_frequency_snapshots(dense_model, calib_text, tmp_path):
    toks = tmp_path / "t.npy"
    tokenize_file(dense_model, calib_text, toks)
    out = tmp_path / "o.dat"
    collect(
        dense_model,
        toks,
        out,
        CollectSettings(
            n_ctx=128,
            n_batch=256,
            last_chunk=7,
            save_frequency=3,
            output_format="dat",
            compute_ppl=False,
        ),
    )
    snaps = sorted(p.name for p in tmp_path.glob("o.dat.at_*"))
    assert snaps == ["o.dat.at_4", "o.dat.at_6"]  # groups of 2: counts pass 3 at 4, 6 at 6
    assert read_imatrix(tmp_path / "o.dat.at_6", chunk_size=128).chunk_count == 6
    assert read_imatrix(out, chunk_size=128).chunk_count == 7


def test_llama_log_goes_through_logging(
    dense_model, calib_text, tmp_path, capfd, caplog, monkeypatch
):
    """Nothing from llama.cpp is printed raw: its log reaches Python logging."""
    import logging

    caplog.set_level(logging.DEBUG, logger="imatrix.llama")
    root = logging.getLogger()
    # keep only pytest's handlers: stderr handlers left by other tests' CLI runs would
    # print our formatted records, and only raw llama.cpp output may reach fd 2
    keep = [h for h in root.handlers if type(h).__module__.startswith("_pytest")]
    monkeypatch.setattr(root, "handlers", keep)
    toks = tmp_path / "t.npy"
    tokenize_file(dense_model, calib_text, toks)
    capfd.readouterr()
    collect(
        dense_model,
        toks,
        None,
        CollectSettings(n_ctx=128, last_chunk=2, compute_ppl=False, progress=False),
    )
    out = capfd.readouterr()
    assert out.out == "" and "llama" not in out.err
    assert any(
        "llama_context" in r.getMessage() for r in caplog.records if r.name == "imatrix.llama"
    )


def test_tokenize_text_matches_model_load(dense_model, calib_text):
    with load_model(dense_model, vocab_only=True) as v, load_model(dense_model) as m:
        data = calib_text.read_bytes()[:500]
        np.testing.assert_array_equal(tokenize_text(v, data), tokenize_text(m, data))


def test_layout_guard_refuses_a_mismatch(monkeypatch):
    assert ggml.check_layout().op_mul_mat != ggml.check_layout().op_mul_mat_id
    ggml.check_layout.cache_clear()
    monkeypatch.setattr(ggml, "GGML_OBJECT_SIZE", 16)
    try:
        with pytest.raises(ImatrixError, match="ggml_tensor_overhead"):
            ggml.check_layout()
    finally:
        ggml.check_layout.cache_clear()


def test_layout_guard_checks_field_offsets(monkeypatch):
    """A struct whose fields are shifted (same size) is caught by the field checks."""

    class Shifted(ggml.GGMLTensor.__base__):  # type: ignore[misc, name-defined]
        _fields_ = (("pad", ggml.ctypes.c_int64), *ggml.GGMLTensor._fields_[:-1])

    ggml.check_layout.cache_clear()
    monkeypatch.setattr(ggml, "GGMLTensor", Shifted)
    try:
        with pytest.raises(ImatrixError, match="layout"):
            ggml.check_layout()
    finally:
        monkeypatch.undo()
        ggml.check_layout.cache_clear()


def test_threads_and_shared_inputs_do_not_change_the_sums(tiny_model, tokens, caplog):
    """Splitting columns over threads and reusing a shared input's sums are exact."""
    import logging

    kw = dict(n_ctx=128, n_batch=256, last_chunk=6, compute_ppl=False)
    plain = collect(
        tiny_model,
        tokens,
        None,
        CollectSettings(threads=1, reuse_inputs=False, stop_early=False, **kw),
    )
    caplog.set_level(logging.DEBUG, logger="imatrix.collect")
    fast = collect(
        tiny_model,
        tokens,
        None,
        CollectSettings(threads=2, sum_threads=2, reuse_inputs=True, **kw),
    )
    _same_entries(plain.data, fast.data)
    # 3 graphs of 2 layers; q/k/v share an input, so do gate/up (or the experts' gate/up):
    # 3 reuses per layer; the MoE layers also observe the router (ffn_gate_inp)
    observed = 48 if "moe" in tiny_model.name else 42
    msg = [r.getMessage() for r in caplog.records if "reused" in r.getMessage()]
    assert msg == [f"{observed} tensors observed, 18 of them reused a shared input's sums"]
    # every reuse is taken while its node is asked about: no graph split of its own
    split = [r.getMessage() for r in caplog.records if "graph split" in r.getMessage()]
    assert split == ["18 of the reuses needed no graph split of their own"]


@pytest.fixture(params=["untied", "tied"])
def probe_model(request, dense_model, models_dir):
    """The dense model, and one that projects onto its token embedding (as gemma does)."""
    if request.param == "untied":
        return dense_model
    from tinymodels import DENSE, write_tiny_model

    return write_tiny_model(models_dir / "tiny-tied.gguf", DENSE, seed=1, tied=True)


def _probe_lines(caplog) -> list[str]:
    keys = ("output projection", "graphs will stop", "not cut early")
    return [r.getMessage() for r in caplog.records if any(k in r.getMessage() for k in keys)]


def test_the_probe_ends_at_the_output_projection(probe_model, calib_text, tmp_path, caplog):
    """The probe's decode is aborted when the output projection is asked about (its
    weight is ``output.weight``, or ``token_embd.weight`` in a tied model); it arms the
    same cut as a probe that runs in full, the probe's abort is not counted as a
    chunk's, and the bytes are those of uncut graphs."""
    import logging

    from imatrix.collect import collector

    toks = tmp_path / "calib.npy"
    tokenize_file(probe_model, calib_text, toks)
    kw = dict(n_ctx=128, n_batch=512, last_chunk=8, compute_ppl=False)
    caplog.set_level(logging.DEBUG, logger="imatrix.collect")
    short = collect(probe_model, toks, None, CollectSettings(**kw))
    lines = _probe_lines(caplog)
    assert lines == [
        "the probe's decode ended at the output projection",
        "graphs will stop after 'blk.1.ffn_down.weight' (nothing needs the rest)",
    ]
    caplog.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(collector, "HEAD_WEIGHTS", frozenset())
        full_probe = collect(probe_model, toks, None, CollectSettings(**kw))
    assert _probe_lines(caplog) == lines[1:]
    uncut = collect(probe_model, toks, None, CollectSettings(stop_early=False, **kw))
    assert short.stopped_early and full_probe.stopped_early
    assert short.aborted_decodes == full_probe.aborted_decodes == 2
    _same_entries(short.data, full_probe.data)
    _same_entries(short.data, uncut.data)


def test_a_needed_tensor_after_the_projection_disarms_the_cut(
    dense_model, calib_text, tmp_path, monkeypatch, caplog
):
    """Were a needed tensor computed after the output projection, a probe ended there
    would not see it: the scheduler still asks about it, and the cut is not armed.
    (No model here has one; a needed tensor is named as the projection instead.)"""
    import logging

    from imatrix.collect import collector

    tokens = tmp_path / "calib.npy"
    tokenize_file(dense_model, calib_text, tokens)
    kw = dict(n_ctx=128, n_batch=512, last_chunk=6, compute_ppl=False)
    full = collect(dense_model, tokens, None, CollectSettings(stop_early=False, **kw))
    monkeypatch.setattr(collector, "HEAD_WEIGHTS", frozenset({"blk.1.attn_q.weight"}))
    caplog.set_level(logging.DEBUG, logger="imatrix.collect")
    res = collect(dense_model, tokens, None, CollectSettings(**kw))
    assert _probe_lines(caplog) == [
        "the probe's decode ended at the output projection",
        "graphs are not cut early: a needed tensor follows the output projection",
    ]
    assert not res.stopped_early and res.aborted_decodes == 0
    _same_entries(res.data, full.data)


def test_a_wrong_probe_is_caught_and_undone(tiny_model, tokens, monkeypatch, caplog):
    """If the probe named a tensor that is not the last one of the real graphs, the first
    decode's check notices, puts the sums back and decodes again in full."""
    import logging

    from imatrix.collect.graph_cut import GraphCut

    kw = dict(n_ctx=128, n_batch=256, last_chunk=6, compute_ppl=False)
    full = collect(tiny_model, tokens, None, CollectSettings(stop_early=False, **kw))
    original = GraphCut.finish_probe

    def wrong(self, n_tokens):
        armed = original(self, n_tokens)
        self.stop_after = self.sequence[len(self.sequence) // 2]  # a tensor in the middle
        return armed

    monkeypatch.setattr(GraphCut, "finish_probe", wrong)
    caplog.set_level(logging.DEBUG, logger="imatrix.collect")
    res = collect(tiny_model, tokens, None, CollectSettings(**kw))
    assert not res.stopped_early
    assert any("differ from the probe" in r.getMessage() for r in caplog.records)
    _same_entries(res.data, full.data)
