"""The collector's pieces alone, without a model: chunk plan, settings, checkpoint
cadence, checkpoint round trip and refusal, resume decision, graph-cut state machine,
accumulator bookkeeping, job records, SIGTERM handling.

End-to-end behaviour (and parity with llama-imatrix) is in test_collect_lib.py,
test_collect.py and test_crash_resume.py.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from imatrix.activations import ColumnSums
from imatrix.collect.accumulate import Accumulators
from imatrix.collect.checkpoint import (
    CorruptCheckpoint,
    StaleCheckpoint,
    checkpoint_due,
    checkpoint_path,
    exact_sums,
    load_checkpoint,
    signature,
    start_point,
    write_checkpoint,
)
from imatrix.collect.graph_cut import GraphCut, Mode
from imatrix.collect.job import prepare_job
from imatrix.collect.plan import (
    ChunkPlan,
    load_token_source,
    plan_batches,
    plan_chunks,
    provenance_for,
)
from imatrix.collect.settings import CollectSettings
from imatrix.collect.shared_inputs import SharedInputs
from imatrix.collect.termination import TERMINATED_EXIT_CODE, Terminated, finish_on_sigterm
from imatrix.errors import ImatrixError
from imatrix.model import Entry, ImatrixData, Provenance
from imatrix.perplexity import Perplexity
from imatrix.tokenize import tokens_sha256

# --- plan ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_ctx", "n_batch", "expected"),
    [
        (512, 2048, (4, 2048, 2048)),
        (512, 512, (1, 512, 512)),
        (512, 64, (1, 512, 64)),
        (128, 300, (2, 256, 256)),
    ],
)
def test_plan_batches_as_llama_imatrix(n_ctx, n_batch, expected):
    assert plan_batches(n_ctx, n_batch) == expected


@pytest.mark.parametrize(("n_ctx", "n_batch"), [(0, 512), (512, 0), (-1, 5)])
def test_plan_batches_refuses_non_positive(n_ctx, n_batch):
    with pytest.raises(ImatrixError, match="must be positive"):
        plan_batches(n_ctx, n_batch)


def test_plan_chunks_range():
    toks = np.arange(100, dtype=np.int32)
    plan = plan_chunks(toks, CollectSettings(n_ctx=10, n_batch=30))
    assert (plan.first, plan.last, plan.n_seq, plan.n_kv, plan.n_batch) == (0, 10, 3, 30, 30)
    plan = plan_chunks(toks, CollectSettings(n_ctx=10, first_chunk=9, last_chunk=10))
    assert plan.n_chunks == 1
    for first, last in ((0, 11), (3, 3), (-1, 2), (5, 4)):
        with pytest.raises(ImatrixError, match=r"chunk range \[.*10 chunks of 10 tokens"):
            plan_chunks(toks, CollectSettings(n_ctx=10, first_chunk=first, last_chunk=last))


def test_groups_cover_the_range_in_sequences_per_batch():
    plan = plan_chunks(np.zeros(100, np.int32), CollectSettings(n_ctx=10, n_batch=30))
    assert list(plan.groups(1)) == [(1, 3), (4, 3), (7, 3)]
    assert list(plan.groups(8)) == [(8, 2)]
    assert list(plan.groups(10)) == []


def test_batches_of_one_chunk_in_two_decodes_with_bos():
    toks = np.arange(40, dtype=np.int32)
    plan = plan_chunks(toks, CollectSettings(n_ctx=8, n_batch=4))
    b = list(plan.batches(2, 1, bos=-1))
    assert [(x.start, x.size) for x in b] == [(0, 4), (4, 4)]
    assert b[0].tokens.tolist() == [-1, 17, 18, 19]  # BOS replaces the chunk's first token
    assert b[1].tokens.tolist() == [20, 21, 22, 23]
    assert b[1].positions.tolist() == [4, 5, 6, 7]
    assert b[0].seq_ids.tolist() == [0, 0, 0, 0]
    assert toks[16] == 16  # the caller's tokens are untouched


def test_batches_of_parallel_sequences_without_bos():
    toks = np.arange(40, dtype=np.int32)
    plan = plan_chunks(toks, CollectSettings(n_ctx=4, n_batch=8))
    (b,) = plan.batches(1, 2, bos=None)
    assert b.tokens.tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert b.positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert b.seq_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert plan.chunk(3).tolist() == [12, 13, 14, 15]


def test_token_source_from_array_and_from_file(tmp_path):
    src = load_token_source(np.arange(5, dtype=np.int64), "mine")
    assert src.tokens.dtype == np.int32 and src.dataset == "mine" and src.meta is None
    with pytest.raises(ImatrixError, match="1-D"):
        load_token_source(np.zeros((2, 2), np.int32), None)
    p = tmp_path / "t.npy"
    np.save(p, np.arange(7, dtype=np.int32))
    src = load_token_source(p, None)
    assert src.dataset == str(p) and src.tokens.tolist() == list(range(7))


def test_provenance_from_a_tokens_record():
    meta = {"model_sha256": "m" * 64, "text_sha256": "t" * 64, "tokenizer": {"b": 1, "a": 2}}
    prov = provenance_for(None, meta)
    assert prov.model_sha256 == "m" * 64 and prov.dataset_sha256 == ["t" * 64]
    assert prov.tokenizer == '{"a":2,"b":1}'
    given = Provenance(model_sha256="g" * 64)
    assert provenance_for(given, meta) is given  # what the caller says wins
    assert provenance_for(None, None) == Provenance()


# --- settings ----------------------------------------------------------------------


def test_settings_validate_and_early_stop():
    with pytest.raises(ImatrixError, match="unknown output format 'xml'"):
        CollectSettings(output_format="xml").validate()
    s = CollectSettings(compute_ppl=False)
    assert s.may_stop_early
    assert not replace(s, stop_early=False).may_stop_early
    assert replace(s, stop_early=True).may_stop_early
    assert not replace(s, compute_ppl=True).may_stop_early
    assert not replace(s, process_output=True).may_stop_early


# --- checkpoint cadence --------------------------------------------------------------


def test_checkpoint_cadence_counts_from_the_first_chunk():
    """12 chunks from 0 in groups of 2, every 3 chunks: after 4, 6 and 10 (never after
    the last group); from chunk 1 in groups of 4, every 4: after 5 and 9."""
    due = [
        r
        for g0, r in zip(range(0, 12, 2), range(2, 14, 2), strict=True)
        if checkpoint_due(g0, r, first=0, last=12, frequency=3)
    ]
    assert due == [4, 6, 10]
    due = [
        g0 + 4
        for g0 in range(1, 13, 4)
        if checkpoint_due(g0, g0 + 4, first=1, last=13, frequency=4)
    ]
    assert due == [5, 9]
    assert not checkpoint_due(0, 5, first=0, last=12, frequency=0)


# --- checkpoint round trip and refusals ------------------------------------------------

SIG = {
    "model_sha256": "a" * 64,
    "tokens_sha256": "b" * 64,
    "n_ctx": 8,
    "first_chunk": 0,
    "last_chunk": 10,
    "dataset": "d.txt",
    "process_output": False,
    "base_datasets": [],
}


def _data(reached: int | None = 4) -> ImatrixData:
    rng = np.random.default_rng(0)
    dense = Entry(rng.random(6) * 10, np.array([32.0]), rng.standard_normal(6))
    moe = Entry(rng.random(8), np.array([3.0, 0.0, 20.0, 9.0]), rng.standard_normal(8))
    data = ImatrixData(
        entries={"blk.0.attn_q.weight": dense, "blk.0.ffn_up_exps.weight": moe},
        datasets=["d.txt"],
        chunk_size=8,
        provenance=Provenance(model_sha256="a" * 64, chunk_reached=reached),
    )
    data.chunk_count = data.derived_chunk_count()
    return data


def _write(path: Path, sig=SIG, ppl: Perplexity | None = None) -> ImatrixData:
    data = _data()
    counts = {n: [int(c) for c in e.counts] for n, e in data.entries.items()}
    write_checkpoint(path, data, sig, counts, ppl, verbosity=1)
    return data


def test_checkpoint_round_trip(tmp_path):
    ck = checkpoint_path(tmp_path / "o.gguf")
    assert ck.name == "o.gguf.checkpoint"
    ppl = Perplexity()
    ppl.add_chunk(np.array([1.5, 2.25]))
    data = _write(ck, ppl=ppl)
    got, reached, state = load_checkpoint(ck, SIG)
    assert reached == 4 and state["signature"] == SIG
    assert Perplexity.from_state(state["ppl"]) == ppl
    for n, e in data.entries.items():
        np.testing.assert_array_equal(got.entries[n].values, e.values.astype(np.float32))
        np.testing.assert_array_equal(got.entries[n].counts, e.counts)


def test_exact_checkpoint_restores_the_float64_sums(tmp_path):
    """A checkpoint off the cadence (SIGTERM) carries the unrounded sums."""
    ck = tmp_path / "o.checkpoint"
    data = _data()
    counts = {n: [int(c) for c in e.counts] for n, e in data.entries.items()}
    write_checkpoint(ck, data, SIG, counts, None, 1, exact_sums(data.entries))
    got, _, state = load_checkpoint(ck, SIG)
    assert set(state["exact"]) == set(data.entries)
    for n, e in data.entries.items():
        assert not np.array_equal(e.values, e.values.astype(np.float32))  # not float32 values
        np.testing.assert_array_equal(got.entries[n].values, e.values)
        np.testing.assert_array_equal(got.entries[n].sums, e.sums)


@pytest.mark.parametrize("key", sorted(SIG))
def test_checkpoint_of_other_settings_is_stale(tmp_path, key):
    ck = tmp_path / "o.checkpoint"
    _write(ck)
    other = {**SIG, key: ["changed"]}
    with pytest.raises(StaleCheckpoint, match=rf"different settings \({key}\)"):
        load_checkpoint(ck, other)


def test_signature_names_the_in_file_data():
    """Two --in-file inputs of the same datasets but other sums sign differently; no
    --in-file adds no key (checkpoints made before the key existed stay valid)."""
    toks = np.arange(10, dtype=np.int32)
    kw = dict(model_sha=None, tokens=toks, n_ctx=8, first=0, last=1, dataset=None)
    a, b = _data(), _data()
    b.entries["blk.0.attn_q.weight"].values = b.entries["blk.0.attn_q.weight"].values * 2
    sa = signature(process_output=False, base=a, **kw)
    sb = signature(process_output=False, base=b, **kw)
    plain = signature(process_output=False, base=None, **kw)
    assert sa["base_datasets"] == sb["base_datasets"] == ["d.txt"]
    assert sa["base_sha256"] != sb["base_sha256"]
    assert "base_sha256" not in plain and plain["base_datasets"] == []
    assert sa["tokens_sha256"] == tokens_sha256(toks)


def test_a_checkpoint_with_a_key_we_lack_is_stale(tmp_path):
    """Settings are compared both ways: a checkpoint made with --in-file is refused by a
    run without one even if nothing else differs."""
    ck = tmp_path / "o.checkpoint"
    _write(ck, sig={**SIG, "base_sha256": "c" * 64})
    with pytest.raises(StaleCheckpoint, match=r"different settings \(base_sha256\)"):
        load_checkpoint(ck, SIG)


def test_checkpoint_outside_the_range_is_stale(tmp_path):
    ck = tmp_path / "o.checkpoint"
    _write(ck, sig={**SIG, "first_chunk": 5})
    with pytest.raises(StaleCheckpoint, match="outside the range"):
        load_checkpoint(ck, {**SIG, "first_chunk": 5})


def test_damaged_checkpoint_is_corrupt(tmp_path):
    ck = tmp_path / "o.checkpoint"
    _write(ck)
    blob = bytearray(ck.read_bytes())
    blob[-3] ^= 0x10
    ck.write_bytes(bytes(blob))
    with pytest.raises(CorruptCheckpoint, match="checksum mismatch"):
        load_checkpoint(ck, SIG)


def test_start_point_decisions(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="imatrix.collect")
    ck = tmp_path / "o.checkpoint"
    base = ImatrixData(entries={"blk.0.x.weight": Entry(np.ones(2), np.array([1.0]))})
    kw = dict(first=2, base=base, compute_ppl=True)
    fresh = start_point(ck, SIG, resume=True, **kw)  # no checkpoint: start from the base
    assert (fresh.chunk, fresh.resumed_from, list(fresh.entries)) == (2, None, ["blk.0.x.weight"])
    assert fresh.entries["blk.0.x.weight"] is not base.entries["blk.0.x.weight"]  # a copy
    assert fresh.ppl == Perplexity()
    _write(ck)
    ignored = start_point(ck, SIG, resume=False, **kw)
    assert ignored.chunk == 2 and "no --resume" in caplog.text
    resumed = start_point(ck, SIG, resume=True, **kw)
    assert (resumed.chunk, resumed.resumed_from) == (4, 4)
    assert "has no perplexity state" in caplog.text  # written without one
    assert "resuming from" in caplog.text
    ck.write_bytes(ck.read_bytes()[:100])
    broken = start_point(ck, SIG, resume=True, first=2, base=None, compute_ppl=False)
    assert broken.chunk == 2 and broken.entries == {} and broken.ppl is None
    assert "starting from chunk 2" in caplog.text


# --- graph cut -------------------------------------------------------------------------


def _probe(cut: GraphCut, seen: list[tuple[str, int]], small: bool = False) -> bool:
    cut.start_probe()
    assert cut.mode is Mode.PROBE
    for name, rows in seen:
        cut.record(name, rows)
    if small:
        cut.saw_small()
    return cut.finish_probe(32)


def test_probe_arms_after_the_last_needed_tensor():
    cut = GraphCut()
    assert _probe(cut, [("a", 32), ("b", 32), ("c", 32)])
    assert cut.stop_after == "c" and cut.sequence == ("a", "b", "c")
    assert cut.mode is Mode.COLLECT


@pytest.mark.parametrize(
    ("seen", "small"),
    [
        ([], False),  # nothing needed
        ([("a", 32), ("b", 32), ("a", 32)], False),  # a tensor twice
        ([("a", 32), ("b", 16)], False),  # a tensor not covering every token
        ([("a", 32)], True),  # a needed MUL_MAT skipped for too few rows
    ],
)
def test_probe_does_not_arm_when_unsafe(seen, small):
    cut = GraphCut()
    assert not _probe(cut, seen, small)
    assert cut.stop_after is None


def test_a_needed_tensor_after_the_head_disarms_the_probe():
    cut = GraphCut()
    assert not cut.saw_head()  # not probing: nothing to end
    cut.start_probe()
    cut.asked_needed()  # before the head: fine
    cut.record("a", 32)
    assert cut.saw_head() and not cut.saw_head()  # ended once
    assert cut.finish_probe(32) and cut.stop_after == "a"
    cut.start_probe()  # a new probe forgets the old head
    cut.record("a", 32)
    assert cut.saw_head()
    cut.asked_needed()
    assert not cut.finish_probe(32) and cut.stop_after == "a"  # the old arming stays


def test_verify_confirms_or_disarms_for_good():
    cut = GraphCut()
    _probe(cut, [("a", 32), ("b", 32)])
    cut.start_verify()
    assert cut.mode is Mode.VERIFY
    cut.record("a", 100)
    cut.record("b", 100)
    assert cut.finish_verify(100) and cut.stop_after == "b"
    cut.start_verify()
    cut.record("a", 100)
    cut.record("b", 60)  # the real graph stopped short of b
    assert not cut.finish_verify(100) and cut.stop_after is None


def test_small_nodes_outside_a_probe_change_nothing():
    cut = GraphCut()
    cut.saw_small()
    assert _probe(cut, [("a", 32)])


def test_mode_transitions_are_checked():
    cut = GraphCut()
    with pytest.raises(RuntimeError, match="cannot go to COLLECT from COLLECT"):
        cut.finish_probe(32)
    cut.start_probe()
    with pytest.raises(RuntimeError, match="cannot go to VERIFY from PROBE"):
        cut.start_verify()
    with pytest.raises(RuntimeError, match="cannot go to COLLECT from PROBE"):
        cut.finish_verify(32)


# --- accumulators and the shared-input cache -------------------------------------------


def test_accumulator_bookkeeping():
    base = {
        "b": Entry(np.array([1.1, 2.2]), np.array([3.0]), np.array([0.1, 0.2])),
        "a": Entry(np.array([1.0 + 2**-30, 4.0, 5.0, 6.0]), np.array([640.0, 130.0])),
    }
    acc = Accumulators(base, ColumnSums(1), SharedInputs(False))
    assert acc.entries["a"] is not base["a"]
    assert list(acc.sorted_entries()) == ["a", "b"]
    assert acc.chunk_count(128) == 5
    assert acc.exact_counts() == {"b": [3], "a": [640, 130]}
    snap = acc.snapshot()
    acc.entries["a"].values += 1
    acc.restore(snap)
    assert acc.entries["a"].values[0] == 1.0 + 2**-30
    acc.round_to_float32()
    assert acc.entries["a"].values[0] == 1.0
    assert acc.entries["b"].sums.tolist() == [float(np.float32(0.1)), float(np.float32(0.2))]
    assert Accumulators(None, ColumnSums(1), SharedInputs(False)).chunk_count(128) == 0


def test_shared_inputs_cache_one_entry_when_enabled():
    on, off = SharedInputs(True), SharedInputs(False)
    parts = {0: (np.zeros(2), np.zeros(2))}
    for c in (on, off):
        c.put(("k",), [(0, 10)], parts)
    assert off.get(("k",)) is None and not off.holding
    assert on.get(("j",)) is None and on.n_reused == 0
    assert on.get(("k",)) is parts and on.n_reused == 1
    on.clear()
    assert on.get(("k",)) is None


# --- job ---------------------------------------------------------------------------------


def test_job_records_base_and_own_datasets(tmp_path):
    base = ImatrixData(datasets=["old.txt"], provenance=Provenance(dataset_sha256=["o" * 64]))
    job = prepare_job(
        "m.gguf",
        np.arange(64, dtype=np.int32),
        tmp_path / "out.gguf",
        CollectSettings(n_ctx=16, first_chunk=1),
        dataset="new.txt",
        provenance=Provenance(model_sha256="m" * 64, dataset_sha256=["n" * 64]),
        base=base,
    )
    assert job.checkpoint == tmp_path / "out.gguf.checkpoint"
    assert job.signature["base_datasets"] == ["old.txt"]
    assert (job.signature["first_chunk"], job.signature["last_chunk"]) == (1, 4)
    entries = {"blk.0.x.weight": Entry(np.ones(4), np.array([48.0]))}
    data = job.data(entries, reached=3)
    assert data.datasets == ["old.txt", "new.txt"]
    assert data.provenance.dataset_sha256 == ["o" * 64, "n" * 64]
    assert (data.provenance.chunk_reached, data.chunk_count, data.chunk_size) == (3, 3, 16)
    with pytest.raises(ImatrixError, match="unknown output format"):
        prepare_job(
            "m.gguf",
            np.arange(64, dtype=np.int32),
            None,
            CollectSettings(output_format="csv"),
            dataset=None,
            provenance=None,
            base=None,
        )


# --- SIGTERM -------------------------------------------------------------------------


@pytest.fixture
def default_sigterm():
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_becomes_a_stop_request(default_sigterm):
    with finish_on_sigterm() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs between two bytecodes of the main thread
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_programs_own_sigterm_handler_is_kept(default_sigterm):
    def own(_signum, _frame):
        pass

    signal.signal(signal.SIGTERM, own)
    with finish_on_sigterm() as stop:
        assert signal.getsignal(signal.SIGTERM) is own and not stop.requested
    assert signal.getsignal(signal.SIGTERM) is own


def test_no_handler_from_another_thread(default_sigterm):
    seen = []

    def worker() -> None:
        with finish_on_sigterm():
            seen.append(signal.getsignal(signal.SIGTERM))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [signal.SIG_DFL]


def test_terminated_ends_a_process_with_status_143():
    stop = Terminated(6, Path("o.gguf.checkpoint"))
    assert isinstance(stop, SystemExit) and stop.code == TERMINATED_EXIT_CODE == 143
    assert (stop.reached, stop.checkpoint) == (6, Path("o.gguf.checkpoint"))


@pytest.mark.parametrize(
    ("n_ctx", "n_batch", "n_ubatch", "group", "per"),
    [
        (512, 2048, 512, 4, 1),  # llama-imatrix: 4 x 128 rows per ubatch, whole tiles
        (512, 2048, 512, 3, 0),  # a last group of 3: 170 rows each, not whole tiles
        (512, 2048, 512, 1, 1),  # one chunk: the same ubatch as llama-imatrix's
        (128, 512, 512, 4, 4),  # the group is one ubatch
        (128, 2048, 512, 16, 0),  # 16 x 32 rows: another attention kernel
        (256, 1024, 512, 4, 2),  # 4 x 128 rows; ours 2 x 256
        (1024, 2048, 512, 2, 0),  # a chunk spans two ubatches
        (512, 256, 512, 1, 0),  # a chunk spans two decodes
    ],
)
def test_abort_split(n_ctx, n_batch, n_ubatch, group, per):
    s = CollectSettings(n_ctx=n_ctx, n_batch=n_batch)
    plan = plan_chunks(np.arange(n_ctx * 16, dtype=np.int32), s)
    assert plan.abort_split(group, n_ubatch) == per


@pytest.mark.parametrize(("n_seq", "n_ubatch"), [(4, 512), (5, 512), (3, 100), (2, 2048), (1, 64)])
def test_interleave_puts_rows_where_runs_find_them(n_seq, n_ubatch):
    """Every token of every sequence is where :meth:`BatchSpec.runs` says, in blocks of
    ``n_ubatch // n_seq`` tokens of each sequence (llama.cpp's equal split)."""
    n_ctx = 256
    plan = plan_chunks(
        np.arange(n_ctx * 8, dtype=np.int32), CollectSettings(n_ctx=n_ctx, n_batch=n_ctx * n_seq)
    )
    (spec,) = plan.batches(0, n_seq, bos=None)
    inter = ChunkPlan.interleave(spec, n_ubatch)
    rows = n_ubatch // n_seq
    assert inter.block == (rows if n_seq > 1 and rows < n_ctx else 0)
    assert sorted(inter.tokens.tolist()) == sorted(spec.tokens.tolist())
    if inter.block:
        first = inter.seq_ids[: n_seq * rows].reshape(n_seq, rows)
        assert (first == np.arange(n_seq)[:, None]).all()
    for s in range(n_seq):
        runs = list(inter.runs(s, 3, n_ctx - 1))
        got = np.concatenate([inter.tokens[r : r + c] for r, _, c in runs])
        assert np.array_equal(got, np.arange(s * n_ctx + 3, (s + 1) * n_ctx - 1))
        assert all(inter.tokens[r] == s * n_ctx + j and inter.positions[r] == j for r, j, _ in runs)
        assert all((inter.seq_ids[r : r + c] == s).all() for r, _, c in inter.runs(s, 0, n_ctx))
    if inter.block:
        with pytest.raises(ValueError, match="one after the other"):
            list(ChunkPlan.split(inter, 1))


def test_split_keeps_sequences_whole():
    plan = plan_chunks(np.arange(64 * 5, dtype=np.int32), CollectSettings(n_ctx=64, n_batch=256))
    (spec,) = plan.batches(0, 4, bos=None)
    parts = list(plan.split(spec, 3))
    assert [p.tokens.size for p in parts] == [192, 64]
    assert np.array_equal(np.concatenate([p.tokens for p in parts]), spec.tokens)
    assert np.array_equal(parts[1].seq_ids, np.full(64, 3))
    assert np.array_equal(parts[1].positions, np.arange(64))
