"""Health check: each problem is found, with the right level, share and exit code."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imatrix.cli import main
from imatrix.formats import to_gguf_bytes, write_imatrix
from imatrix.health import (
    CHECKS,
    FAIL,
    WARN,
    check_imatrix,
    expected_from_model,
    format_report,
    resolve_levels,
)
from imatrix.model import Entry, ImatrixData

ROW = 16


def healthy(n_layers: int = 2, n_exp: int = 4, tokens: float = 512.0) -> ImatrixData:
    rng = np.random.default_rng(0)
    ents = {}
    for i in range(n_layers):
        ents[f"blk.{i}.attn_q.weight"] = Entry(
            rng.random(ROW) + 0.5, [tokens], rng.normal(size=ROW)
        )
        ents[f"blk.{i}.ffn_up_exps.weight"] = Entry(
            rng.random(ROW * n_exp) + 0.5, np.full(n_exp, tokens), rng.normal(size=ROW * n_exp)
        )
    return ImatrixData(entries=ents, datasets=["d.txt"], chunk_count=1, chunk_size=512)


def codes(report) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in report.findings:
        out.setdefault(f.check, []).append(f.tensor)
    return out


def test_healthy_imatrix_has_no_findings() -> None:
    r = check_imatrix(healthy())
    assert r.findings == [] and r.ok and not r.failed
    assert r.to_dict()["status"] == "ok"
    assert "OK" in format_report(r)


def test_each_problem_is_reported_where_it_is() -> None:
    d = healthy()
    q0 = d.entries["blk.0.attn_q.weight"]
    q0.values[3] = np.nan
    q0.sums[5] = np.inf
    up1 = d.entries["blk.1.ffn_up_exps.weight"]
    up1.counts[[1, 3]] = 0.0
    up1.values[ROW : 2 * ROW] = 0.0  # a dead expert's own channels are not "zero channels"
    up1.values[3 * ROW : 4 * ROW] = 0.0
    up1.values[[0, 2, 2 * ROW + 7]] = 0.0  # three zero channels in experts that fired
    up1.counts[2] = 40.0
    d.entries["blk.1.attn_q.weight"].counts[:] = 0.0
    d.entries["blk.0.ffn_up_exps.weight"].values[4] = -1.0
    r = check_imatrix(d, min_tokens=100)
    c = codes(r)
    assert c == {
        "non_finite": ["blk.0.attn_q.weight"],
        "negative": ["blk.0.ffn_up_exps.weight"],
        "no_data": ["blk.1.attn_q.weight"],
        "dead_experts": ["blk.1.ffn_up_exps.weight"],
        "zero_channels": ["blk.1.ffn_up_exps.weight"],
        "few_tokens": ["blk.1.ffn_up_exps.weight"],
    }
    f = {x.check: x for x in r.findings}
    assert f["non_finite"].value == 2 and f["non_finite"].level == FAIL
    assert f["dead_experts"].value == pytest.approx(0.5) and f["dead_experts"].level == WARN
    assert "#1, 3" in f["dead_experts"].message
    assert f["zero_channels"].value == pytest.approx(3 / (2 * ROW))
    assert f["few_tokens"].value == 40 and "#2" in f["few_tokens"].message
    assert r.failed
    assert r.to_dict()["failures"] == 3 and r.to_dict()["warnings"] == 3


def test_few_tokens_threshold() -> None:
    d = healthy(tokens=100.0)
    assert codes(check_imatrix(d, min_tokens=100)) == {}
    c = codes(check_imatrix(d, min_tokens=101))
    assert sorted(c["few_tokens"]) == sorted(d.entries)


def test_levels_are_configurable() -> None:
    d = healthy()
    d.entries["blk.0.ffn_up_exps.weight"].counts[0] = 0.0
    assert check_imatrix(d).ok
    assert check_imatrix(d, fail_on=["dead_experts"]).failed
    assert check_imatrix(d, fail_on=["warn"]).failed
    d.entries["blk.0.attn_q.weight"].values[0] = np.nan
    assert check_imatrix(d).failed
    assert check_imatrix(d, warn_on=["non_finite"]).ok
    lv = resolve_levels(fail_on=["warn"])
    assert set(lv.values()) == {FAIL} and set(lv) == set(CHECKS)
    with pytest.raises(ValueError, match="unknown check 'bogus'"):
        resolve_levels(fail_on=["bogus"])


def test_missing_metadata_fails() -> None:
    d = healthy()
    d.has_metadata = False
    r = check_imatrix(d)
    assert codes(r) == {"no_metadata": [None]} and r.failed


def test_model_coverage(dense_model, moe_model) -> None:
    """Weights of the model without an entry, and entries of the wrong size."""
    for model, n_exp in ((dense_model, 1), (moe_model, 4)):
        expected = expected_from_model(str(model))
        assert "blk.0.attn_q.weight" in expected and "output.weight" not in expected
        assert not any(n.endswith("norm.weight") for n in expected)
        ents = {
            n: Entry(np.ones(size), np.full(n_exp if "_exps" in n else 1, 600.0))
            for n, size in expected.items()
        }
        d = ImatrixData(entries=ents, datasets=["x"], chunk_count=1, chunk_size=512)
        assert check_imatrix(d, expected=expected).findings == []
        first = sorted(expected)[0]
        del d.entries[first]
        d.entries["blk.1.attn_k.weight"] = Entry(np.ones(7), [600.0])
        c = codes(check_imatrix(d, expected=expected))
        assert c == {"missing_tensor": [first], "size_mismatch": ["blk.1.attn_k.weight"]}
    moe = expected_from_model(str(moe_model))
    assert moe["blk.0.ffn_up_exps.weight"] == 256 * 4  # ne[0] * n_expert
    assert moe["blk.0.ffn_down_exps.weight"] == 512 * 4


def test_cli_exit_codes_and_json(tmp_path, capsys) -> None:
    good = tmp_path / "good.gguf"
    write_imatrix(healthy(), good)
    assert main(["check", str(good)]) == 0
    assert "OK" in capsys.readouterr().out

    d = healthy()
    d.entries["blk.0.ffn_up_exps.weight"].counts[2] = 0.0
    warn = tmp_path / "warn.gguf"
    write_imatrix(d, warn)
    assert main(["check", str(warn)]) == 0
    assert main(["check", str(warn), "--fail-on", "dead_experts"]) == 1
    assert main(["check", str(warn), "--fail-on", "zero_channels,warn"]) == 1
    capsys.readouterr()
    assert main(["check", str(warn), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["status"] == "warn" and rep["findings"][0]["check"] == "dead_experts"
    assert rep["findings"][0]["value"] == pytest.approx(0.25)

    # NaN in a file: reported, not refused while reading
    bad = healthy()
    bad.entries["blk.1.attn_q.weight"].values[0] = np.nan
    nan_file = tmp_path / "nan.gguf"
    nan_file.write_bytes(to_gguf_bytes(bad))
    assert main(["check", str(nan_file)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "blk.1.attn_q.weight" in out and "non_finite" in out
    assert main(["check", str(nan_file), "--warn-on", "non_finite"]) == 0
    capsys.readouterr()

    assert main(["check", str(good), "--fail-on", "bogus"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bogus" in err
    assert main(["check", str(tmp_path / "nope.gguf")]) == 1
    assert "nope.gguf" in capsys.readouterr().err


def test_cli_with_model(tmp_path, moe_model, capsys) -> None:
    expected = expected_from_model(str(moe_model))
    ents = {
        n: Entry(np.ones(s), np.full(4 if "_exps" in n else 1, 600.0)) for n, s in expected.items()
    }
    del ents["blk.1.ffn_down_exps.weight"]
    f = tmp_path / "partial.gguf"
    write_imatrix(ImatrixData(entries=ents, datasets=["x"], chunk_count=1, chunk_size=512), f)
    assert main(["check", str(f), "-m", str(moe_model)]) == 0
    out = capsys.readouterr().out
    assert "missing_tensor" in out and "blk.1.ffn_down_exps.weight" in out
    assert main(["check", str(f), "-m", str(moe_model), "--fail-on", "missing_tensor"]) == 1
