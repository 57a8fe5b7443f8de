"""The convergence record and ``--until-converged``.

The record's figures are recomputed here from per-chunk sums (one collection per
chunk, added up in the test) with numpy, not with the library's functions; a stopped
run is compared with a run of ``--chunks`` set to where it stopped.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from imatrix.cli import main
from imatrix.collect import CollectSettings, checkpoint_path, collect
from imatrix.constants import KEY_CONVERGENCE, PROVENANCE_PREFIX
from imatrix.convergence import (
    ConvergenceLog,
    Record,
    StopRule,
    converged_at,
    parse_stop_rule,
    record_due,
    record_interval,
)
from imatrix.convergence_table import convergence_table, verdict
from imatrix.errors import ImatrixError
from imatrix.formats import read_imatrix, to_gguf_bytes
from imatrix.gguf_io import read_gguf
from imatrix.tokenize import tokenize_file
from imatrix.workflow.config import check_until_converged

#: chunk size and chunks per group (one per decode: a record can fall after any chunk)
N_CTX = 64
BASE = dict(n_ctx=N_CTX, n_batch=N_CTX, compute_ppl=False, threads=2, progress=False)


@pytest.fixture
def tokens(tiny_model, calib_text, tmp_path):
    out = tmp_path / "calib.npy"
    tokenize_file(tiny_model, calib_text, out)
    return out


# -- pure parts -------------------------------------------------------------------


def test_interval_follows_ofreq_capped_at_eight():
    assert [record_interval(f) for f in (0, -1, 1, 3, 8, 10, 100)] == [8, 8, 1, 3, 8, 8, 8]
    # a group of 4 chunks crossing 8 gets the record; one that does not, none
    assert record_due(4, 8, first=0, interval=8) and not record_due(0, 4, first=0, interval=8)
    assert record_due(6, 9, first=0, interval=8)  # crosses 8 inside the group
    assert record_due(9, 10, first=2, interval=8) and not record_due(8, 9, first=2, interval=8)


@pytest.mark.parametrize(
    ("text", "rule"),
    [("1e-4", StopRule(1e-4, 2)), ("0.01:3", StopRule(0.01, 3)), ("2:1", StopRule(2.0, 1))],
)
def test_stop_rule_parses(text, rule):
    assert parse_stop_rule(text) == rule


@pytest.mark.parametrize("text", ["0", "-1e-3", "1e-3:0", "1e-3:-2", "abc", "1e-3:x", "nan", ""])
def test_stop_rule_refuses_bad_values(text):
    with pytest.raises(ValueError):
        parse_stop_rule(text)


def _rec(k: int, mx: float) -> Record:
    return Record(k, k, k * 10, mx, mx / 10, "t", {"t": mx})


def test_converged_at_needs_patience_consecutive_records():
    recs = [_rec(1, 0.5), _rec(2, 1e-4), _rec(3, 0.2), _rec(4, 1e-4), _rec(5, 2e-4), _rec(6, 1)]
    assert converged_at(recs, StopRule(1e-3, 2)).chunk == 5
    assert converged_at(recs, StopRule(1e-3, 1)).chunk == 2
    assert converged_at(recs, StopRule(1e-3, 3)) is None
    log = ConvergenceLog(8, recs, StopRule(1e-3, 2), chunks_used=6, stopped_at=5)
    back = ConvergenceLog.from_json(log.to_json(), "x")
    assert back == log
    assert verdict(back, StopRule(1e-3, 2)).startswith("converged after 50 tokens (5 chunks")
    assert verdict(back, StopRule(1e-5, 2)).startswith("not converged after 60 tokens")


def test_table_has_shard_rows_and_a_merged_view():
    a = ConvergenceLog(8, [_rec(8, 0.1), _rec(16, 0.01)])
    b = ConvergenceLog(8, [_rec(8, 0.3), _rec(16, 0.001)])
    df = convergence_table([("d1", 0, a), ("d1", 1, b)])
    merged = df[df["view"] == "merged"]
    assert list(merged["tokens"]) == [80, 160]
    assert list(merged["max"]) == [0.3, 0.01]
    assert list(merged["worst"]) == ["d1/1: t", "d1/0: t"]
    assert len(df[df["view"] == "shard"]) == 4


def test_plot_draws_every_shard_and_a_single_file(tmp_path):
    from imatrix.convergence_plot import plot_convergence, shard_lines

    a = ConvergenceLog(8, [_rec(8, 0.1), _rec(16, 0.01)])
    one = convergence_table([("d", None, a)])
    assert [(n, list(m)) for n, _, m in shard_lines(one[one["view"] == "shard"])] == [
        ("d", [0.1, 0.01])
    ]
    two = convergence_table([("d", 0, a), ("e", 3, a)])
    assert [n for n, _, _ in shard_lines(two[two["view"] == "shard"])] == ["d/0", "e/3"]
    png = plot_convergence(two, tmp_path / "c.png", eps=1e-3, title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_shows_single_records_and_says_there_is_no_trend(tmp_path):
    """Shards of few chunks have one record each: a line through one point is invisible,
    so every record is a marker, and a note says why there is no line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from imatrix.convergence_plot import SINGLE_RECORD_NOTE, convergence_figure, plot_convergence

    logs = [
        ("d", 0, ConvergenceLog(8, [_rec(8, 0.9)])),
        ("e", 1, ConvergenceLog(8, [_rec(8, 0.5)])),
    ]
    df = convergence_table(logs)
    fig = convergence_figure(df, eps=1e-3, title="t")
    ax = fig.axes[0]
    drawn = [line for line in ax.lines if not line.get_label().startswith("EPS")]
    assert [line.get_label() for line in drawn] == ["d/0 max", "e/1 max", "all: max", "all: median"]
    for line in drawn:
        assert len(line.get_xdata()) == 1
        assert line.get_marker() not in (None, "", " ", "None") and line.get_markersize() > 0
    (note,) = ax.texts
    assert note.get_text() == SINGLE_RECORD_NOTE
    FigureCanvasAgg(fig).draw()
    box = note.get_window_extent()
    assert not box.overlaps(ax.get_legend().get_window_extent())
    points = ax.transData.transform([(x, y) for line in drawn for x, y in line.get_xydata()])
    assert not any(box.contains(x, y) for x, y in points)
    assert plot_convergence(df, tmp_path / "c.png", eps=1e-3, title="t").stat().st_size > 0

    a = ConvergenceLog(8, [_rec(8, 0.1), _rec(16, 0.01)])
    trend = convergence_figure(
        convergence_table([("d", 0, a), ("e", 1, logs[1][2])]), eps=1e-3, title="t"
    )
    assert len(trend.axes[0].texts) == 0  # one shard has a trend: no note


@pytest.mark.parametrize("value", ["0", "1e-3:0", "x", -1.0, 0])
def test_config_rule_is_validated(value):
    with pytest.raises(ImatrixError, match=r"collect\.until_converged"):
        check_until_converged(value)
    assert check_until_converged(None) is None
    assert check_until_converged("1e-4:3") == StopRule(1e-4, 3)
    assert check_until_converged(0.5) == StopRule(0.5, 2)


@pytest.mark.parametrize("arg", ["0", "-0.1", "1e-3:0", "eps", "1e-3:2:3"])
def test_cli_refuses_a_bad_rule_with_exit_2(arg, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["collect", "-m", "m.gguf", "-f", "t.txt", "--until-converged", arg])
    assert exc.value.code == 2
    assert "--until-converged" in capsys.readouterr().err


# -- the record, recomputed ---------------------------------------------------------


def _means(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean squared activation per expert, ones where an expert has no tokens."""
    m = values.reshape(counts.size, -1) / np.where(counts > 0, counts, 1)[:, None]
    m[counts == 0] = 1.0
    return m


def test_record_matches_per_chunk_sums(tiny_model, tokens):
    """Records every 2 chunks (-ofreq 2) of 6 chunks, against sums of single chunks."""
    n = 6
    res = collect(
        tiny_model, tokens, None, CollectSettings(last_chunk=n, output_frequency=2, **BASE)
    )
    chunks = [
        collect(
            tiny_model, tokens, None, CollectSettings(first_chunk=k, last_chunk=k + 1, **BASE)
        ).data.entries
        for k in range(n)
    ]
    names = sorted(chunks[0])
    prev = {name: None for name in names}
    recs = res.convergence.records
    assert [r.chunk for r in recs] == [2, 4, 6] and [r.tokens for r in recs] == [128, 256, 384]
    for r in recs:
        all_changes = []
        for name in names:
            vals = sum(c[name].values for c in chunks[: r.chunk])
            counts = sum(c[name].counts for c in chunks[: r.chunk])
            now = _means(vals, counts)
            before = np.ones_like(now) if prev[name] is None else prev[name]
            live = counts > 0
            cos = (
                (now * before).sum(1) / np.linalg.norm(now, axis=1) / np.linalg.norm(before, axis=1)
            )
            change = 1.0 - cos[live]
            all_changes.extend(change)
            assert r.per_tensor[name] == pytest.approx(change.max(), rel=1e-3, abs=1e-7), name
            prev[name] = now
        assert r.max == pytest.approx(max(all_changes), rel=1e-3, abs=1e-7)
        assert r.median == pytest.approx(float(np.median(all_changes)), rel=1e-3, abs=1e-7)
    assert recs[0].max > recs[-1].max  # against "no data" (ones) the first change is large


# -- stopping -------------------------------------------------------------------------


def test_until_converged_equals_a_run_of_that_many_chunks(tiny_model, tokens, tmp_path):
    kw = dict(BASE, last_chunk=10, output_frequency=2)
    full = collect(tiny_model, tokens, None, CollectSettings(**kw)).convergence.records
    # a threshold two records in a row get under, before the end
    rule = StopRule(max(full[1].max, full[2].max) * 1.001, 2)
    expect = converged_at(full, rule)
    assert expect is not None and expect.chunk < 10

    stopped = tmp_path / "stopped.gguf"
    res = collect(tiny_model, tokens, stopped, CollectSettings(until_converged=rule, **kw))
    assert res.last_chunk == expect.chunk == res.convergence.stopped_at
    assert res.convergence.chunks_used == expect.chunk and res.n_tokens == expect.tokens
    assert not checkpoint_path(stopped).exists()

    plain = tmp_path / "plain.gguf"
    collect(tiny_model, tokens, plain, CollectSettings(**{**kw, "last_chunk": expect.chunk}))
    a, b = read_imatrix(stopped), read_imatrix(plain)
    assert a.chunk_count == b.chunk_count == expect.chunk
    for name in b.entries:
        for attr in ("values", "counts", "sums"):
            np.testing.assert_array_equal(
                getattr(a.entries[name], attr), getattr(b.entries[name], attr)
            )
    log = json.loads(a.provenance.convergence)
    assert log["stopped_at"] == expect.chunk and log["rule"] == {"eps": rule.eps, "patience": 2}
    assert log["chunks_used"] == expect.chunk

    # --compat: the stopped run's bytes are those of the plain run's data
    comp = tmp_path / "stopped.compat.gguf"
    collect(tiny_model, tokens, comp, CollectSettings(until_converged=rule, compat=True, **kw))
    assert comp.read_bytes() == to_gguf_bytes(b, compat=True)
    keys = read_gguf(comp, load_data=False).kv
    assert not [k for k in keys if k.startswith(PROVENANCE_PREFIX)]


def test_a_rule_never_met_collects_everything(dense_model, calib_text, tmp_path):
    toks = tmp_path / "t.npy"
    tokenize_file(dense_model, calib_text, toks)
    rule = StopRule(1e-30, 1)
    res = collect(
        dense_model, toks, None, CollectSettings(last_chunk=5, until_converged=rule, **BASE)
    )
    assert res.last_chunk == 5 and res.convergence.stopped_at is None


def test_resume_across_a_record_boundary_is_byte_identical(dense_model, calib_text, tmp_path):
    """-ofreq 10: records after 8 and 16 chunks, checkpoints after 10; interrupted at 12,
    the resumed run needs the reference of chunk 8 from the checkpoint."""
    toks = tmp_path / "t.npy"
    tokenize_file(dense_model, calib_text, toks)
    kw = dict(BASE, last_chunk=18, output_frequency=10, n_batch=2 * N_CTX)
    whole = tmp_path / "whole.gguf"
    collect(dense_model, toks, whole, CollectSettings(**kw), dataset="calib")
    recs = json.loads(read_imatrix(whole).provenance.convergence)["records"]
    assert [r["chunk"] for r in recs] == [8, 16]

    out = tmp_path / "out.gguf"

    def interrupt(k: int, _p: float | None) -> None:
        if k == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        collect(dense_model, toks, out, CollectSettings(**kw), dataset="calib", on_chunk=interrupt)
    state = json.loads(
        read_gguf(checkpoint_path(out), load_data=False).get(PROVENANCE_PREFIX + "checkpoint")
    )
    assert state["convergence"]["reference"] is not None  # off a record point: carried
    collect(dense_model, toks, out, CollectSettings(resume=True, **kw), dataset="calib")
    assert out.read_bytes() == whole.read_bytes()
    assert KEY_CONVERGENCE in read_gguf(out, load_data=False).kv


# -- workflow ---------------------------------------------------------------------------


def test_workflow_shards_stop_and_their_records_make_the_table(
    dense_model, calib_text, tmp_path, caplog
):
    """collect.until_converged stops each shard on its own and records the chunks used;
    convergence.parquet holds every shard's record and the merged view."""
    import pandas as pd

    from imatrix.workflow.steps import collect_shard, convergence_statistics

    toks = tmp_path / "t.npy"
    tokenize_file(dense_model, calib_text, toks)
    kw = dict(
        dataset="alpha",
        shards=2,
        chunks_per_shard=None,
        chunks=16,
        n_ctx=N_CTX,
        n_batch=N_CTX,
        n_ubatch=N_CTX,
        process_output=False,
        ppl=False,
        ngl=0,
        threads=2,
        output_frequency=2,
    )
    shards = [str(tmp_path / f"{s}.gguf") for s in range(2)]
    with caplog.at_level("INFO", logger="imatrix.workflow.steps"):
        for s, path in enumerate(shards):
            collect_shard(str(dense_model), str(toks), path, shard=s, until_converged="0.5:2", **kw)
    logs = [ConvergenceLog.from_json(read_imatrix(p).provenance.convergence, p) for p in shards]
    # the tiny model's changes are all below 0.5: two records (2 chunks apart), then stop
    assert all(r.max < 0.5 for c in logs for r in c.records)
    assert [c.chunks_used for c in logs] == [4, 4] and [c.stopped_at for c in logs] == [4, 12]
    assert "dataset alpha shard 1 converged: used 4 of 8 chunks" in caplog.text

    table, plot = tmp_path / "stats/convergence.parquet", tmp_path / "stats/convergence.png"
    convergence_statistics(shards, ["alpha", "alpha"], str(table), str(plot), eps=0.5)
    df = pd.read_parquet(table)
    assert plot.stat().st_size > 0
    shard_rows = df[df["view"] == "shard"]
    assert shard_rows["shard"].tolist() == [0, 0, 1, 1]
    assert shard_rows["max"].tolist() == [r.max for c in logs for r in c.records]
    merged = df[df["view"] == "merged"]
    assert merged["tokens"].tolist() == [2 * N_CTX, 4 * N_CTX]
    assert merged["max"].tolist() == [max(c.records[i].max for c in logs) for i in range(2)]
