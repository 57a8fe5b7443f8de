"""Statistics: every column recomputed here with plain loops over a small imatrix.

The reference below is deliberately naive (Python floats, explicit loops, the
definitions as docs/statistics.md states them) so that it shares nothing with the
vectorized implementation but the definitions.
"""

from __future__ import annotations

import errno
import math
import re

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from imatrix.cli import main
from imatrix.errors import ImatrixError
from imatrix.formats import read_imatrix, write_imatrix
from imatrix.model import Entry, ImatrixData
from imatrix.stats import (
    compare_imatrices,
    compute_statistics,
    render_statistics,
    write_comparison_parquet,
    write_parquet,
)

ROW = 8
N_EXP = 3


def f32(x: np.ndarray) -> np.ndarray:
    """Values exactly representable in the files' F32."""
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def small_imatrix(seed: int = 0, with_sums: bool = True) -> ImatrixData:
    """Three layers with every case the statistics must handle.

    - ``attn_q`` in every layer; two zero channels and one nearly dead channel
      (E[x²] = 1e-6, below llama-imatrix's 1e-5 threshold) in layer 1;
    - ``ffn_up_exps`` with 3 experts; expert 2 never fired in layer 1;
    - ``ffn_down`` only in layers 0 and 2 (layer 2 has no previous-layer counterpart);
    - ``attn_k`` in layers 1 and 2, with all counts zero in layer 1 (no statistics, and
      layer 2's counterpart has none either);
    - ``output.weight`` outside the blocks.
    """
    rng = np.random.default_rng(seed)
    ents: dict[str, Entry] = {}

    def entry(n_mat: int, counts: list[float], zero_rows: tuple[int, ...] = ()) -> Entry:
        c = np.array(counts, dtype=np.float64)
        x2 = f32(rng.gamma(2.0, 1.0, size=(n_mat, ROW)) * c[:, None])
        s = f32(rng.normal(0.2, 1.0, size=(n_mat, ROW)) * np.sqrt(np.maximum(c, 1.0))[:, None])
        for r in zero_rows:
            x2[r] = 0.0
            s[r] = 0.0
        return Entry(x2.reshape(-1), c, s.reshape(-1) if with_sums else None)

    for layer in range(3):
        ents[f"blk.{layer}.attn_q.weight"] = entry(1, [64.0 * (layer + 1)])
        ents[f"blk.{layer}.ffn_up_exps.weight"] = entry(
            N_EXP,
            [40.0, 25.0, 0.0] if layer == 1 else [30.0 + layer, 20.0, 14.0],
            zero_rows=(2,) if layer == 1 else (),
        )
    q1 = ents["blk.1.attn_q.weight"]
    q1.values[[1, 5]] = 0.0
    q1.values[3] = np.float32(1e-6 * 128)
    if q1.sums is not None:
        q1.sums[[1, 5]] = 0.0
    ents["blk.0.ffn_down.weight"] = entry(1, [192.0])
    ents["blk.2.ffn_down.weight"] = entry(1, [192.0])
    ents["blk.1.attn_k.weight"] = entry(1, [0.0], zero_rows=(0,))
    ents["blk.2.attn_k.weight"] = entry(1, [192.0])
    ents["output.weight"] = entry(1, [192.0])
    return ImatrixData(entries=ents, datasets=["synthetic.txt"], chunk_count=3, chunk_size=64)


# ---------------------------------------------------------------------------
# the reference, in plain loops


def ref_tensor(e: Entry) -> dict:
    values, counts = [float(v) for v in e.values], [float(c) for c in e.counts]
    n_mat = len(counts)
    row = len(values) // n_mat
    cnt = [int(math.floor(c + 0.5)) for c in counts]
    act = []
    for i in range(n_mat):
        if cnt[i] == 0:
            continue
        for j in range(row):
            act.append(values[i * row + j] / cnt[i])
    r: dict = {"elements": len(act), "n_mat_active": sum(1 for c in cnt if c)}
    if not act:
        return r
    n = len(act)
    total = math.fsum(act)
    mean = total / n
    std = math.sqrt(math.fsum((a - mean) ** 2 for a in act) / n)
    entropy = 0.0
    for a in act:
        p = a / total
        if p > 0:
            entropy -= p * math.log2(p)
    r.update(
        sum_sqact=total,
        sqact_min=min(act),
        sqact_max=max(act),
        sqact_mean=mean,
        sqact_std=std,
        active_pct=100.0 * sum(1 for a in act if abs(a) > 1e-5) / n,
        entropy=entropy,
        entropy_norm_pct=100.0 * entropy / math.log2(n),
        zd_pct=100.0 * sum(1 for a in act if std > 0 and (a - mean) / std > 1.0) / n,
    )
    if e.sums is not None:
        sums = [float(s) for s in e.sums]
        avg = []
        m = []
        for i in range(n_mat):
            for j in range(row):
                v = sums[i * row + j] / cnt[i] if cnt[i] else 0.0
                avg.append(v)
                if cnt[i]:
                    m.append(v)
        am = math.fsum(m) / len(m)
        sd = math.sqrt(math.fsum((x - am) ** 2 for x in m) / (len(m) - 1))
        r.update(
            act_min=min(m),
            act_max=max(m),
            act_mean=am,
            act_std=sd,
            act_zd_pct=100.0 * sum(1 for x in m if abs((x - am) / sd) > 1.0) / len(m),
            _avg=avg,
        )
    return r


def ref_cos(a: list[float], b: list[float]) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    na = math.sqrt(math.fsum(x * x for x in a))
    nb = math.sqrt(math.fsum(y * y for y in b))
    return dot / (na * nb)


def ref_cos_guarded(a: list[float], b: list[float]) -> float:
    na = math.fsum(x * x for x in a)
    nb = math.fsum(y * y for y in b)
    if na > 0 and nb > 0:
        return max(-1.0, min(1.0, ref_cos(a, b)))
    return 1.0 if na == 0 and nb == 0 else 0.0


def ref_l2(a: list[float], b: list[float]) -> float:
    return math.sqrt(math.fsum((x - y) ** 2 for x, y in zip(a, b, strict=True)))


def ref_statistics(data: ImatrixData) -> tuple[dict[str, dict], dict[int, dict]]:
    per = {name: ref_tensor(e) for name, e in data.entries.items()}
    for name, r in per.items():
        m = re.search(r"blk\.(\d+)\.", name)
        r["layer"] = int(m.group(1)) if m else None
        prev = None
        if m:
            prev = name.replace(f"blk.{m.group(1)}.", f"blk.{int(m.group(1)) - 1}.", 1)
        if prev in per and r["elements"] and per[prev]["elements"]:
            r["prev"] = prev
            r["cossim"] = ref_cos(
                [float(v) for v in data.entries[name].values],
                [float(v) for v in data.entries[prev].values],
            )
            if "_avg" in r:
                a, b = r["_avg"], per[prev]["_avg"]
                r["l2_dist"] = ref_l2(a, b)
                r["cossim_act"] = ref_cos_guarded(a, b)
                r["ecs"] = 100.0 * math.exp(-0.01 * r["l2_dist"]) * abs(r["cossim_act"]) ** 10
    layers: dict[int, dict] = {}
    for layer in sorted({r["layer"] for r in per.values() if r["layer"] is not None}):
        names = [n for n, r in per.items() if r["layer"] == layer and r["elements"]]
        n_el = sum(per[n]["elements"] for n in names)
        lr = {
            "n_tensors": len(names),
            "elements": n_el,
            "sum_sqact": math.fsum(per[n]["sum_sqact"] for n in names),
            "wmean_sum_sqact": math.fsum(per[n]["elements"] * per[n]["sum_sqact"] for n in names)
            / n_el,
            "wmean_zd_pct": math.fsum(per[n]["elements"] * per[n]["zd_pct"] for n in names) / n_el,
        }
        with_prev = [n for n in names if "prev" in per[n]]
        if with_prev:
            lr["wmean_cossim"] = (
                math.fsum(per[n]["elements"] * per[n]["cossim"] for n in with_prev) / n_el
            )
        if all("_avg" in per[n] for n in names):
            lr["act_zd_pct"] = (
                math.fsum(per[n]["elements"] * per[n]["act_zd_pct"] for n in names) / n_el
            )
            if with_prev:
                cur = [x for n in with_prev for x in per[n]["_avg"]]
                prv = [x for n in with_prev for x in per[per[n]["prev"]]["_avg"]]
                lr["l2_dist"] = ref_l2(cur, prv)
                lr["cossim_act"] = ref_cos_guarded(cur, prv)
                lr["ecs"] = 100.0 * math.exp(-0.01 * lr["l2_dist"]) * abs(lr["cossim_act"]) ** 10
        layers[layer] = lr
    return per, layers


TENSOR_COLUMNS = (
    "elements n_mat_active sum_sqact sqact_min sqact_max sqact_mean sqact_std active_pct "
    "entropy entropy_norm_pct zd_pct cossim act_min act_max act_mean act_std act_zd_pct "
    "l2_dist cossim_act ecs"
).split()
LAYER_COLUMNS = (
    "n_tensors elements sum_sqact wmean_sum_sqact wmean_zd_pct wmean_cossim act_zd_pct "
    "l2_dist cossim_act ecs"
).split()


def assert_matches(got: object, want: object, what: str) -> None:
    if want is None:
        assert got is None or pd.isna(got), f"{what}: expected no value, got {got}"
        return
    assert got is not None and not pd.isna(got), f"{what}: expected {want}, got nothing"
    assert float(got) == pytest.approx(float(want), rel=1e-12, abs=1e-12), what


@pytest.mark.parametrize("with_sums", [True, False])
def test_every_column_matches_plain_loops(with_sums: bool) -> None:
    data = small_imatrix(with_sums=with_sums)
    tensors, layers = compute_statistics(data)
    ref_t, ref_l = ref_statistics(data)
    assert sorted(tensors["name"]) == sorted(data.entries)
    checked = 0
    for row in tensors.to_dict("records"):
        ref = ref_t[row["name"]]
        for col in TENSOR_COLUMNS:
            if col.startswith("act_") or col in ("l2_dist", "cossim_act", "ecs"):
                want = ref.get(col) if with_sums else None
            else:
                want = ref.get(col)
            if col == "elements" or col == "n_mat_active":
                assert int(row[col]) == want, (row["name"], col)
            else:
                assert_matches(row[col], want, f"{row['name']} {col}")
            checked += 1
        assert (pd.isna(row["layer"]) and ref["layer"] is None) or row["layer"] == ref["layer"]
    assert checked == len(data.entries) * len(TENSOR_COLUMNS)
    assert list(layers["layer"]) == sorted(ref_l)
    for row in layers.to_dict("records"):
        ref = ref_l[row["layer"]]
        for col in LAYER_COLUMNS:
            if col in ("n_tensors", "elements"):
                assert int(row[col]) == ref[col], (row["layer"], col)
            else:
                assert_matches(row[col], ref.get(col), f"layer {row['layer']} {col}")


def test_edge_cases_are_what_the_docs_say() -> None:
    data = small_imatrix()
    t, lay = compute_statistics(data)
    t = t.set_index("name")
    # a dead expert is left out of N; a tensor without any count has no statistics
    assert t.loc["blk.1.ffn_up_exps.weight", "elements"] == 2 * ROW
    assert t.loc["blk.1.ffn_up_exps.weight", "n_mat_active"] == 2
    assert t.loc["blk.1.attn_k.weight", "elements"] == 0
    assert np.isnan(t.loc["blk.1.attn_k.weight", "sum_sqact"])
    # cross-layer columns are null without a usable previous layer
    for name in (
        "blk.0.attn_q.weight",
        "blk.2.ffn_down.weight",
        "blk.2.attn_k.weight",
        "output.weight",
    ):
        assert np.isnan(t.loc[name, "cossim"]) and np.isnan(t.loc[name, "ecs"]), name
    # zero channels and the nearly dead one count as inactive: 3 of 8
    assert t.loc["blk.1.attn_q.weight", "active_pct"] == pytest.approx(100.0 * 5 / 8)
    assert pd.isna(t.loc["output.weight", "layer"]) and t.loc["output.weight", "tensor"] == "output"
    assert list(lay["layer"]) == [0, 1, 2]
    assert np.isnan(lay.loc[0, "wmean_cossim"]) and np.isnan(lay.loc[0, "l2_dist"])


def test_ecs_constant_is_a_parameter() -> None:
    data = small_imatrix()
    t100, l100 = compute_statistics(data)
    t1, l1 = compute_statistics(data, ecs_k=1.0)
    m = t100["ecs"].notna()
    assert m.sum() >= 3
    np.testing.assert_allclose(t1.loc[m, "ecs"] * 100.0, t100.loc[m, "ecs"], rtol=1e-12)
    np.testing.assert_allclose(l1["ecs"].dropna() * 100.0, l100["ecs"].dropna(), rtol=1e-12)


def test_identical_layers_score_perfectly() -> None:
    """Two layers with the same data: CosSim 1, L2 0, ECS = K (the definition's maximum)."""
    rng = np.random.default_rng(5)
    e = Entry(f32(rng.random(16) + 0.1), [10.0], f32(rng.normal(size=16)))
    data = ImatrixData(entries={"blk.0.x.weight": e, "blk.1.x.weight": e.copy()})
    t, lay = compute_statistics(data, ecs_k=7.0)
    r = t.set_index("name").loc["blk.1.x.weight"]
    assert r["cossim"] == pytest.approx(1.0) and r["cossim_act"] == pytest.approx(1.0)
    assert r["l2_dist"] == 0.0 and r["ecs"] == pytest.approx(7.0)
    assert lay.loc[1, "ecs"] == pytest.approx(7.0)


# ---------------------------------------------------------------------------
# Parquet

TENSOR_TYPES = {
    "name": "string", "layer": "int32", "tensor": "string", "n_mat": "int32",
    "n_mat_active": "int32", "row_size": "int64", "count_min": "int64", "count_max": "int64",
    "elements": "int64", "sum_sqact": "double", "sqact_min": "double", "sqact_max": "double",
    "sqact_mean": "double", "sqact_std": "double", "active_pct": "double", "entropy": "double",
    "entropy_norm_pct": "double", "zd_pct": "double", "cossim": "double", "has_sums": "bool",
    "act_min": "double", "act_max": "double", "act_mean": "double", "act_std": "double",
    "act_zd_pct": "double", "l2_dist": "double", "cossim_act": "double", "ecs": "double",
}  # fmt: skip
LAYER_TYPES = {
    "layer": "int32", "n_tensors": "int32", "elements": "int64", "sum_sqact": "double",
    "wmean_sum_sqact": "double", "wmean_zd_pct": "double", "wmean_cossim": "double",
    "act_zd_pct": "double", "l2_dist": "double", "cossim_act": "double", "ecs": "double",
}  # fmt: skip


def test_parquet_reads_back_with_documented_types(tmp_path) -> None:
    data = small_imatrix()
    tensors, layers = compute_statistics(data)
    tp, lp = write_parquet(tensors, layers, tmp_path / "stats")
    assert (tp.name, lp.name) == ("tensors.parquet", "layers.parquet")
    for path, types, frame in ((tp, TENSOR_TYPES, tensors), (lp, LAYER_TYPES, layers)):
        table = pq.read_table(path)
        assert {f.name: str(f.type) for f in table.schema} == types
        assert table.schema.names == list(types)
        assert table.num_rows == len(frame)
    t = pq.read_table(tp).to_pydict()
    i = t["name"].index("blk.0.attn_q.weight")
    assert t["cossim"][i] is None and t["l2_dist"][i] is None  # nulls, not NaN or 0
    assert t["layer"][t["name"].index("output.weight")] is None
    j = t["name"].index("blk.1.attn_q.weight")
    assert t["cossim"][j] == pytest.approx(
        float(tensors.set_index("name").loc[t["name"][j], "cossim"])
    )
    # the documented types are the same without activation sums (the columns are all null)
    _, _ = write_parquet(*compute_statistics(small_imatrix(with_sums=False)), tmp_path / "legacy")
    tl = pq.read_table(tmp_path / "legacy" / "tensors.parquet")
    assert {f.name: str(f.type) for f in tl.schema} == TENSOR_TYPES
    assert tl.column("ecs").null_count == tl.num_rows


def test_parquet_write_is_atomic(tmp_path, monkeypatch) -> None:
    """A write that fails half-way leaves the previous file as it was and no temporary."""
    tensors, layers = compute_statistics(small_imatrix())
    tp, _ = write_parquet(tensors, layers, tmp_path)
    before = tp.read_bytes()
    with pytest.raises(ImatrixError, match="lacks columns"):
        write_parquet(tensors.drop(columns=["ecs"]), layers, tmp_path)

    def disk_full(table, where, **kw):
        with open(where, "wb") as fh:
            fh.write(b"PAR1 half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", disk_full)
    with pytest.raises(ImatrixError, match="no space left"):
        write_parquet(compute_statistics(small_imatrix(seed=9))[0], layers, tmp_path)
    assert tp.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers.parquet", "tensors.parquet"]


# ---------------------------------------------------------------------------
# the text tables

ROW_RE = re.compile(r"^\s*(\S+)\t(\S+)\s*\t")


def table_rows(text: str) -> list[tuple[str, str]]:
    return [
        (m.group(1), m.group(2))
        for line in text.splitlines()
        if (m := ROW_RE.match(line)) and line.count("\t") >= 11
    ]


def test_legacy_table_layout_and_order() -> None:
    data = small_imatrix(with_sums=False)
    text = render_statistics(data, "x.gguf")
    assert "Computing statistics for x.gguf (10 tensors)" in text  # attn_k of layer 1 has no data
    assert "\u03a3(Act\u00b2)" in text and "=" * 169 in text and "=" * 48 in text
    rows = table_rows(text)
    tensors, _ = compute_statistics(data)
    live = tensors[tensors["elements"] > 0]
    # llama-imatrix's order: kind, then Σ(Act²) descending
    want = sorted(
        zip(live["tensor"], live["sum_sqact"], live["name"], strict=True),
        key=lambda r: (r[0], -r[1]),
    )
    assert [k for _, k in rows] == [w[0] for w in want]
    assert ("-", "output") in rows
    assert "Computing weighted average statistics per layer (3 layers)" in text
    layer_lines = [ln for ln in text.splitlines() if re.match(r"^\s+\d+\t\s+[\d.]+\t.*%\t", ln)]
    assert len(layer_lines) == 3
    # the layer-0 CosSim is printed as 0 (no previous layer), as llama-imatrix does
    assert layer_lines[0].endswith("\t0.0000")


def test_preferred_table_when_sums_present() -> None:
    data = small_imatrix()
    text = render_statistics(data, "x.gguf")
    assert "Computing tensor statistics for x.gguf (10 tensors)" in text
    assert "L₂ Dist" in text and "ECS" in text and "=" * 171 in text
    assert "Computing layer statistics (3 layers)" in text
    legacy = render_statistics(data, "x.gguf", legacy=True)
    assert "Σ(Act²)" in legacy and "L₂ Dist" not in legacy
    with pytest.raises(ImatrixError, match="no activation sums"):
        render_statistics(small_imatrix(with_sums=False), "y.gguf", legacy=False)
    # preferred order: kind, then CosSim of mean activations descending
    tensors, _ = compute_statistics(data)
    live = tensors[tensors["elements"] > 0].fillna({"cossim_act": 0.0})
    want = sorted(zip(live["tensor"], live["cossim_act"], strict=True), key=lambda r: (r[0], -r[1]))
    assert [k for _, k in table_rows(text)] == [w[0] for w in want]


# ---------------------------------------------------------------------------
# comparison


def ref_ranks(x: list[float]) -> list[float]:
    out = []
    for v in x:
        less = sum(1 for w in x if w < v)
        equal = sum(1 for w in x if w == v)
        out.append(less + (equal - 1) / 2.0)
    return out


def test_compare_matches_plain_loops() -> None:
    a = small_imatrix(seed=0, with_sums=False)
    b = small_imatrix(seed=1, with_sums=False)
    b.entries["blk.0.attn_q.weight"].values[:4] = a.entries["blk.0.attn_q.weight"].values[:4]
    del b.entries["output.weight"]
    cmp = compare_imatrices(a, b).set_index("name")
    assert not cmp.loc["output.weight", "in_b"] and np.isnan(cmp.loc["output.weight", "cossim"])
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_up_exps.weight", "blk.2.ffn_up_exps.weight"):
        ea, eb = a.entries[name], b.entries[name]
        ma, mb = [], []
        for i in range(ea.n_counts):
            ca, cb = int(ea.counts[i]), int(eb.counts[i])
            if ca and cb:
                ma += [float(v) / ca for v in ea.values[i * ROW : (i + 1) * ROW]]
                mb += [float(v) / cb for v in eb.values[i * ROW : (i + 1) * ROW]]
        ra, rb = ref_ranks(ma), ref_ranks(mb)
        mra, mrb = sum(ra) / len(ra), sum(rb) / len(rb)
        r = cmp.loc[name]
        assert r["cossim"] == pytest.approx(ref_cos(ma, mb), rel=1e-12)
        assert r["spearman"] == pytest.approx(
            ref_cos([x - mra for x in ra], [y - mrb for y in rb]), rel=1e-12
        )
        assert r["mean_ratio"] == pytest.approx(
            (sum(mb) / len(mb)) / (sum(ma) / len(ma)), rel=1e-12
        )
        assert r["experts_compared"] == len(ma) // ROW
    assert cmp.loc["blk.1.ffn_up_exps.weight", "experts_compared"] == 2  # dead expert left out


def test_compare_with_itself_and_a_scaled_copy() -> None:
    a = small_imatrix(with_sums=False)
    b = small_imatrix(with_sums=False)
    for e in b.entries.values():
        e.values *= 2.0
    cmp = compare_imatrices(a, b)
    both = cmp[cmp["cossim"].notna()]
    np.testing.assert_allclose(both["cossim"], 1.0, rtol=1e-12)
    np.testing.assert_allclose(both["spearman"], 1.0, rtol=1e-12)
    np.testing.assert_allclose(both["mean_ratio"], 2.0, rtol=1e-12)


def test_compare_refuses_another_model(tmp_path) -> None:
    a = small_imatrix(with_sums=False)
    b = small_imatrix(with_sums=False)
    b.entries["output.weight"] = Entry(np.ones(2 * ROW), [5.0])
    with pytest.raises(ImatrixError, match=r"output\.weight"):
        compare_imatrices(a, b)


# ---------------------------------------------------------------------------
# CLI


def test_cli_stats_prints_table_and_writes_parquet(tmp_path, capsys) -> None:
    src = tmp_path / "im.gguf"
    write_imatrix(small_imatrix(), src)
    assert main(["stats", str(src), "--parquet", str(tmp_path / "pq"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "L₂ Dist" in out and len(table_rows(out)) == 10
    t = pd.read_parquet(tmp_path / "pq" / "tensors.parquet")
    assert len(t) == len(small_imatrix().entries)
    assert main(["stats", str(src), "--legacy", "-q"]) == 0
    assert "Σ(Act²)" in capsys.readouterr().out
    # a compat file has no sums: the legacy table, like llama-imatrix
    compat = tmp_path / "compat.gguf"
    write_imatrix(read_imatrix(src), compat, compat=True)
    assert main(["stats", str(compat), "-q"]) == 0
    assert "Σ(Act²)" in capsys.readouterr().out


def test_cli_stats_errors_are_one_line(tmp_path, capsys) -> None:
    assert main(["stats", str(tmp_path / "missing.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.gguf" in err
    with pytest.raises(SystemExit) as exc:
        main(["stats", "x.gguf", "--statistic", "bogus"])
    assert exc.value.code == 2


def test_cli_compare(tmp_path, capsys) -> None:
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_imatrix(small_imatrix(seed=0), a)
    write_imatrix(small_imatrix(seed=3), b)
    out_pq = tmp_path / "cmp.parquet"
    assert main(["compare", str(a), str(b), "--parquet", str(out_pq), "-q"]) == 0
    text = capsys.readouterr().out
    assert "CosSim" in text and "blk.1.attn_k" not in text.split("\n")[0]
    cmp = pq.read_table(out_pq)
    assert cmp.num_rows == len(small_imatrix().entries)
    assert str(cmp.schema.field("cossim").type) == "double"
    ref = compare_imatrices(read_imatrix(a), read_imatrix(b))
    np.testing.assert_allclose(cmp.column("cossim").to_numpy(zero_copy_only=False), ref["cossim"])
    assert write_comparison_parquet(ref, tmp_path / "again.parquet").exists()
