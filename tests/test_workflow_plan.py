"""Planned quants in the workflow (``quantize.plans``), on the tiny dense model.

One run of a cut-down test config (one dataset, one shard, one stock type) with a
``like:`` plan and a ``target_bpw:`` plan proves: the dry run lists the estimates,
plan and planned-quantize jobs; each planned quant exists, has exactly the types its
recipe names (every recipe line matches one tensor) and the size the plan predicted;
the like-plan fits in the stock file; the evaluation summary names each planned
row's recipe and takes its type from the file's ftype (the sidecar's), not from the
file name; the shared estimates are one declared output that no plan job rewrote.
Bad plan configs fail before any job with one line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType, GGUFReader
from test_workflow import dry_run, load_config, make_workdir, run, snakemake

pytestmark = pytest.mark.timeout(1200)

M = "tiny"
PLANS = [
    {"name": "mix-like", "like": "Q4_K_M"},
    {"name": "mix-bpw", "target_bpw": 7.5},
]


def plan_config() -> dict:
    """The test config cut to what the plans need, plus the two plans."""
    cfg = load_config()
    cfg["datasets"] = {"alpha": cfg["datasets"]["alpha"]}
    cfg["collect"]["shards"] = 1
    cfg["output_formats"] = ["gguf"]
    cfg["quantize"].update(
        types=["Q4_K_M"],
        compare_without_imatrix=False,
        plans=PLANS,
        planner={"calibration_ctx": 128, "calibration_chunks": 2, "threads": 1},
    )
    cfg["evaluate"]["chunks"] = 2
    return cfg


def recipe_types(path: Path) -> dict[str, str]:
    """Tensor name -> type of each recipe line (``^name$=TYPE``, regex-escaped name)."""
    out = {}
    for token in path.read_text().split():
        pattern, qtype = token.split("=", 1)
        m = re.fullmatch(r"\^(.*)\$", pattern)
        assert m, token
        out[m.group(1).replace("\\", "")] = qtype.upper()
    return out


@pytest.fixture(scope="module")
def planned_run(tmp_path_factory: pytest.TempPathFactory, dense_model: Path) -> Path:
    wd = make_workdir(tmp_path_factory.mktemp("wfplan") / "w", dense_model, plan_config())
    counts, out = dry_run(wd)
    assert counts["plan_estimates"] == 1, out
    assert counts["plan"] == 2 and counts["quantize_plan"] == 2, out
    for p in PLANS:
        assert f"results/{M}/plan/{p['name']}.txt" in out
    run(wd)
    return wd


def test_planned_quants_follow_their_recipes(planned_run: Path) -> None:
    res = planned_run / f"results/{M}"
    stock = (res / f"quant/{M}-Q4_K_M.gguf").stat().st_size
    for p in PLANS:
        recipe = res / f"plan/{p['name']}.txt"
        car = json.loads(Path(f"{recipe}.json").read_text())
        quant = res / f"quant/{M}-{p['name']}.gguf"
        types = {
            t.name: GGMLQuantizationType(t.tensor_type).name for t in GGUFReader(quant).tensors
        }
        wanted = recipe_types(recipe)
        assert wanted and set(wanted) <= set(types)
        assert {n: types[n] for n in wanted} == wanted, p
        assert quant.stat().st_size == car["predicted_size"] <= car["budget"]["bytes"]
        assert car["invocation"]["imatrix"][3] == f"results/{M}/quant/{M}-{p['name']}.gguf"
    like = res / f"quant/{M}-mix-like.gguf"
    assert like.stat().st_size <= stock
    # one estimates file, written by its own job before the plans, which only read it
    est = res / "plan/estimates.parquet"
    assert est.is_file()
    assert est.stat().st_mtime_ns < (res / "plan/mix-like.txt").stat().st_mtime_ns
    assert (planned_run / f"logs/{M}/plan/estimates.log").is_file()


def test_summary_has_recipe_and_ftype(planned_run: Path) -> None:
    import pandas as pd

    res = planned_run / f"results/{M}"
    df = pd.read_parquet(res / "eval/summary.parquet").set_index("model")
    assert pd.isna(df.loc[f"{M}-Q4_K_M", "recipe"])
    assert df.loc[f"{M}-Q4_K_M", "type"] == "Q4_K_M"
    for p in PLANS:
        car = json.loads((res / f"plan/{p['name']}.txt.json").read_text())
        assert df.loc[f"{M}-{p['name']}", "recipe"] == p["name"]
        assert df.loc[f"{M}-{p['name']}", "type"] == car["ftype"]
    assert (res / "eval/kld_vs_size.png").is_file()
    html = (res / "report/evaluation.html").read_text()
    head = re.search(r"<thead>(.*?)</thead>", html, re.S)
    assert head is not None
    columns = re.findall(r"<th>(.*?)</th>", head.group(1))
    assert columns[:3] == ["type", "recipe", "imatrix"] and columns[-1] == "text", columns
    assert "mix-bpw" in html


def test_nothing_left_to_do(planned_run: Path) -> None:
    counts, out = dry_run(planned_run)
    assert counts == {}, out


BAD_PLANS = {
    "type name": (
        [{"name": "q4_k_m", "like": "Q2_K"}],
        "plan name 'q4_k_m' is a llama.cpp type name",
    ),
    "two budgets": (
        [{"name": "mix", "like": "Q2_K", "target_bpw": 5.0}],
        "give exactly one of like, target_bpw, target_size",
    ),
    "duplicate": (
        [{"name": "mix", "like": "Q2_K"}, {"name": "mix", "target_bpw": 5.0}],
        "plan name 'mix' is used twice",
    ),
}


@pytest.mark.parametrize("case", list(BAD_PLANS))
def test_bad_plans_fail_before_any_job(case: str, tmp_path: Path, dense_model: Path) -> None:
    plans, message = BAD_PLANS[case]
    cfg = plan_config()
    cfg["quantize"]["plans"] = plans
    wd = make_workdir(tmp_path / "w", dense_model, cfg)
    proc = snakemake(wd, "-n", "-c1", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    lines = [ln for ln in out.splitlines() if message in ln]
    assert len(lines) == 1 and lines[0].startswith("invalid config: quantize.plans["), out
    assert not (wd / "results").exists()
