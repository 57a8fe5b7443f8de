"""Expert coverage: tokens per expert in ``imatrix check`` (text and strict JSON), the
merge's health gate, ``coverage.parquet`` (merged and per dataset) and the report's view.

The expected numbers are written down by hand: synthetic imatrices with the tiny MoE
model's own tensor names and sizes get counts chosen here (an expert that never fired,
one that fired rarely, a weighted count llama.cpp rounds to 0), and the tests compare
what the code reports with those choices, not with anything the code computed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from imatrix.cli import main
from imatrix.coverage import (
    COVERAGE_FILE,
    QUANTIZE_LOW,
    QUANTIZE_ZERO,
    layer_view,
    write_run_coverage,
)
from imatrix.errors import ImatrixError
from imatrix.formats import write_imatrix
from imatrix.health import FAIL, WARN, check_imatrix, expected_from_model, format_report
from imatrix.model import Entry, ImatrixData, Provenance
from imatrix.workflow.merge import merge_shards
from imatrix.workflow.report import write_statistics_report

#: counts chosen per layer of the tiny MoE (4 experts): layer 0 has an expert that never
#: fired (#1), one that fired rarely (#3: 5 tokens) and a weighted count of 0.4, which
#: llama.cpp rounds to 0 (#2); layer 1 is well covered
CHOSEN = {0: [900.0, 0.0, 0.4, 5.0], 1: [300.0, 200.0, 250.0, 250.0]}
#: the same as llama-quantize reads them (std::lround)
ROUNDED = {0: [900, 0, 0, 5], 1: [300, 200, 250, 250]}


def _layer(name: str) -> int:
    return int(name.split(".")[1])


def synthetic(model: Path, counts: dict[int, list[float]] = CHOSEN) -> ImatrixData:
    """An imatrix for every weight of ``model`` with the chosen counts on its experts."""
    ents = {}
    for name, size in expected_from_model(str(model)).items():
        c = counts[_layer(name)] if "_exps" in name else [1150.0]
        ents[name] = Entry(np.ones(size), c, np.zeros(size))
    return ImatrixData(entries=ents, datasets=["d"], chunk_count=4, chunk_size=128)


def exps_names(model: Path) -> list[str]:
    return sorted(n for n in expected_from_model(str(model)) if "_exps" in n)


def strict_json(text: str) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_check_reports_each_expert_below_the_threshold(moe_model: Path) -> None:
    d = synthetic(moe_model)
    r = check_imatrix(d, min_expert_tokens=10)
    cov = [f for f in r.findings if f.check == "expert_coverage"]
    layer0 = [n for n in exps_names(moe_model) if _layer(n) == 0]
    assert [f.tensor for f in cov] == layer0  # gate, up and down of layer 0, not layer 1
    for f in cov:
        assert f.level == WARN and f.value == 0.0
        assert f.message.startswith(
            "3 of 4 experts saw fewer than 10 tokens: #1 (0), #2 (0), #3 (5);"
        )
        assert QUANTIZE_ZERO in f.message and QUANTIZE_LOW in f.message
    c = r.coverage
    assert c is not None
    assert c["tokens"] == {n: ROUNDED[_layer(n)] for n in exps_names(moe_model)}
    assert (c["expert_tensors"], c["experts"]) == (6, 4)
    assert (c["never_fired"], c["below_min"]) == (3 * 2, 3 * 3)
    assert (c["tokens_min"], c["tokens_max"]) == (0, 900)
    # only the rare expert: the message names its count and only the low-count behaviour
    r5 = check_imatrix(d, min_expert_tokens=5)
    f = next(f for f in r5.findings if f.check == "expert_coverage")
    assert "2 of 4 experts saw fewer than 5 tokens: #1 (0), #2 (0);" in f.message
    r6 = check_imatrix(
        synthetic(moe_model, {0: [9.0, 9.0, 3.0, 9.0], 1: ROUNDED[1]}), min_expert_tokens=4
    )
    f = next(f for f in r6.findings if f.check == "expert_coverage")
    assert "#2 (3)" in f.message and QUANTIZE_LOW in f.message and QUANTIZE_ZERO not in f.message
    # the default reports no expert (the check is opt-in); the summary is always there
    r0 = check_imatrix(d)
    assert not [f for f in r0.findings if f.check == "expert_coverage"]
    assert r0.coverage is not None and r0.coverage["below_min"] == 0
    assert "expert coverage: 6 expert tensors x 4 experts" in format_report(r0)


def test_dense_report_has_no_coverage(dense_model: Path) -> None:
    ents = {n: Entry(np.ones(s), [600.0]) for n, s in expected_from_model(str(dense_model)).items()}
    r = check_imatrix(
        ImatrixData(entries=ents, datasets=["d"], chunk_count=1), min_expert_tokens=10
    )
    assert r.coverage is None and "coverage" not in r.to_dict() and r.findings == []
    assert "expert coverage" not in format_report(r)


def test_check_cli_option_json_and_levels(moe_model: Path, tmp_path: Path, capsys) -> None:
    im = tmp_path / "moe.gguf"
    write_imatrix(synthetic(moe_model), im)
    args = ["check", str(im), "-m", str(moe_model), "--min-expert-tokens", "10"]
    assert main([*args, "--json"]) == 0  # warnings only
    out = strict_json(capsys.readouterr().out)
    assert out["coverage"]["tokens"] == {n: ROUNDED[_layer(n)] for n in exps_names(moe_model)}
    assert out["coverage"]["min_expert_tokens"] == 10
    assert {f["check"] for f in out["findings"]} >= {"expert_coverage", "dead_experts"}
    assert main([*args, "--fail-on", "expert_coverage", "--json"]) == 1
    out = strict_json(capsys.readouterr().out)
    levels = {f["level"] for f in out["findings"] if f["check"] == "expert_coverage"}
    assert levels == {FAIL} and out["status"] == FAIL
    assert main([*args, "--fail-on", "expert_coverage", "--warn-on", "expert_coverage"]) == 1
    capsys.readouterr()
    assert (
        main(["check", str(im), "--min-expert-tokens", "1000", "--fail-on", "expert_coverage"]) == 1
    )
    assert "6 finding(s)" in capsys.readouterr().out  # layer 1 (200..300 tokens) too


def test_check_cli_bad_min_expert_tokens(tmp_path: Path, moe_model: Path, capsys) -> None:
    im = tmp_path / "moe.gguf"
    write_imatrix(synthetic(moe_model), im)
    capsys.readouterr()
    assert main(["check", str(im), "--min-expert-tokens", "-1"]) == 1
    err = capsys.readouterr().err
    assert (
        err == "imatrix check: error: --min-expert-tokens must be a non-negative integer, got -1\n"
    )
    with pytest.raises(SystemExit) as exc:
        main(["check", str(im), "--min-expert-tokens", "ten"])
    assert exc.value.code == 2  # argparse's usage error


def _shard(model: Path, dataset: str, counts: dict[int, list[float]]) -> ImatrixData:
    d = synthetic(model, counts)
    d.datasets = [dataset]
    d.provenance = Provenance(model_sha256="m" * 64, dataset_sha256=[dataset * 64], tokenizer="{}")
    return d


#: two shards of dataset a, one of dataset b (weight 2); per-dataset tokens are raw sums,
#: the merge's are weighted: expert #3 of layer 0 only ever fired in b
SHARDS = {
    ("a", 0): {0: [10.0, 0.0, 3.0, 0.0], 1: [5.0, 5.0, 5.0, 5.0]},
    ("a", 1): {0: [20.0, 0.0, 4.0, 0.0], 1: [6.0, 6.0, 6.0, 6.0]},
    ("b", 0): {0: [1.0, 0.0, 0.0, 2.0], 1: [7.0, 7.0, 7.0, 7.0]},
}
PER_DATASET = {"a": {0: [30, 0, 7, 0], 1: [11, 11, 11, 11]}, "b": {0: [1, 0, 0, 2], 1: [7] * 4}}
MERGED = {0: [32, 0, 7, 4], 1: [25, 25, 25, 25]}  # a + 2·b


def _write_shards(model: Path, where: Path) -> tuple[list[str], list[str]]:
    paths, names = [], []
    for (d, s), counts in SHARDS.items():
        p = where / f"{d}{s}.gguf"
        write_imatrix(_shard(model, d, counts), p)
        paths.append(str(p))
        names.append(d)
    return paths, names


def test_merge_gate_and_coverage_table(moe_model: Path, tmp_path: Path) -> None:
    paths, names = _write_shards(moe_model, tmp_path)
    weights = {"a": 1.0, "b": 2.0}
    out = tmp_path / "merged.gguf"
    gate = {"min_expert_tokens": 5, "fail_on": ["expert_coverage"]}
    with pytest.raises(ImatrixError, match=r"health check failed .*#1 \(0\), #3 \(4\)"):
        merge_shards(paths, names, str(out), weights=weights, health=gate)
    assert not out.exists()
    merge_shards(paths, names, str(out), weights=weights, health={"min_expert_tokens": 5})
    table = pq.read_table(write_run_coverage(str(out), paths, names, tmp_path / COVERAGE_FILE))
    assert [f"{f.name}:{f.type}" for f in table.schema] == [
        "dataset:string", "name:string", "layer:int32", "tensor:string", "expert:int32",
        "tokens:int64",
    ]  # fmt: skip
    rows = table.to_pylist()
    got: dict[tuple[str | None, str], list[int]] = {}
    for r in rows:
        got.setdefault((r["dataset"], r["name"]), []).append(r["tokens"])
        assert (
            r["layer"] == _layer(r["name"])
            and r["name"] == f"blk.{r['layer']}.{r['tensor']}.weight"
        )
    want = {(None, n): MERGED[_layer(n)] for n in exps_names(moe_model)}
    for d, per in PER_DATASET.items():
        want |= {(d, n): per[_layer(n)] for n in exps_names(moe_model)}
    assert got == want
    assert [r["dataset"] for r in rows[:: 4 * 6]] == [None, "a", "b"]  # merged first
    view = layer_view(table.to_pandas(), 5)
    assert view[["dataset", "layer", "never_fired", "below_5", "tokens_min"]].values.tolist() == [
        ["(merged)", 0, 1, 2, 0], ["(merged)", 1, 0, 0, 25],
        ["a", 0, 2, 2, 0], ["a", 1, 0, 0, 11],
        ["b", 0, 2, 4, 0], ["b", 1, 0, 0, 7],
    ]  # fmt: skip


def test_merge_gate_refuses_a_bad_min_expert_tokens(moe_model: Path, tmp_path: Path) -> None:
    paths, names = _write_shards(moe_model, tmp_path)
    out = tmp_path / "merged.gguf"
    for bad in (-1, 1.5, "10", True):
        with pytest.raises(
            ImatrixError, match=r"^health.min_expert_tokens must be a non-negative integer"
        ):
            merge_shards(paths, names, str(out), health={"min_expert_tokens": bad})
    assert not out.exists()


def test_stats_cli_writes_coverage_for_moe_only(
    moe_model: Path, dense_model: Path, tmp_path: Path
) -> None:
    im = tmp_path / "moe.gguf"
    write_imatrix(synthetic(moe_model), im)
    assert main(["stats", str(im), "--parquet", str(tmp_path / "pq"), "--no-table", "-q"]) == 0
    rows = pq.read_table(tmp_path / "pq" / COVERAGE_FILE).to_pylist()
    assert {(r["name"], r["expert"]): r["tokens"] for r in rows} == {
        (n, i): ROUNDED[_layer(n)][i] for n in exps_names(moe_model) for i in range(4)
    }
    assert {r["dataset"] for r in rows} == {None}
    dense = tmp_path / "dense.gguf"
    ents = {n: Entry(np.ones(s), [600.0]) for n, s in expected_from_model(str(dense_model)).items()}
    write_imatrix(ImatrixData(entries=ents, datasets=["d"], chunk_count=1), dense)
    assert main(["stats", str(dense), "--parquet", str(tmp_path / "dq"), "--no-table", "-q"]) == 0
    assert sorted(p.name for p in (tmp_path / "dq").iterdir()) == [
        "layers.parquet",
        "tensors.parquet",
    ]


def test_statistics_report_shows_coverage_for_moe(moe_model: Path, tmp_path: Path) -> None:
    paths, names = _write_shards(moe_model, tmp_path)
    merged = tmp_path / "merged.gguf"
    merge_shards(paths, names, str(merged), weights={"a": 1.0, "b": 2.0})
    assert main(["stats", str(merged), "--parquet", str(tmp_path / "st"), "--no-table", "-q"]) == 0
    cov = write_run_coverage(str(merged), paths, names, tmp_path / "st" / COVERAGE_FILE)
    st = tmp_path / "st"
    html = tmp_path / "statistics.html"
    write_statistics_report(
        str(html), "tiny", str(st / "tensors.parquet"), str(st / "layers.parquet"), str(cov), 5
    )
    page = html.read_text()
    assert "<h2>Expert coverage" in page and "<th>below_5</th>" in page
    assert page.count("<td>(merged)</td>") == 2 and page.count("<td>b</td>") == 2


def test_config_schema_knows_every_check() -> None:
    """health.fail_on/warn_on accept exactly the checks the library has (expert_coverage
    included), and min_expert_tokens defaults to the library's default."""
    import yaml

    from imatrix.coverage import DEFAULT_MIN_EXPERT_TOKENS
    from imatrix.health import CHECKS

    schema = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml").read_text()
    )
    health = schema["properties"]["health"]["properties"]
    for key in ("fail_on", "warn_on"):
        assert set(health[key]["items"]["enum"]) == set(CHECKS), key
    assert health["min_expert_tokens"]["default"] == DEFAULT_MIN_EXPERT_TOKENS
    assert health["min_expert_tokens"]["minimum"] == 0


def test_check_json_stays_strict_with_non_finite_counts(
    moe_model: Path, tmp_path: Path, capsys
) -> None:
    """A NaN or Inf count is a non_finite failure; the coverage counts it as 0 (as no
    tokens) and the JSON has no NaN anywhere."""
    d = synthetic(moe_model)
    d.entries["blk.1.ffn_up_exps.weight"].counts[[0, 2]] = [np.nan, np.inf]
    im = tmp_path / "bad.gguf"
    write_imatrix(d, im)
    capsys.readouterr()
    assert main(["check", str(im), "--json", "--min-expert-tokens", "1"]) == 1
    out = strict_json(capsys.readouterr().out)
    assert out["coverage"]["tokens"]["blk.1.ffn_up_exps.weight"] == [0, 200, 0, 250]
    assert "non_finite" in {f["check"] for f in out["findings"]}
