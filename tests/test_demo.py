"""The demo itself, run the way the README runs it: the real gemma-3-270m, assembled from
its chunk packages (the ``demo`` extra), through tokenize → collect → merge → quantize →
evaluate, by ``snakemake`` started from the root of a copy of this checkout (no ``-s``:
Snakemake finds the workflow as a user's run does, and the demo's config/config.yaml is
the config, copied with a few values made smaller): two chunks of each dataset (one
per shard), one quant type, two evaluation chunks. One dataset is text gemma writes
itself (``generate:``).

What is proven: the outputs exist and are sane; the merged imatrix has an entry for
every tensor llama-imatrix collects on the same F16 base (and no other), with the
chunk count and chunk size asked for; the quant loads; its KL divergence from the base
is finite and positive. The copy keeps results/ and logs/ out of the checkout.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from imatrix.formats import read_imatrix
from imatrix.gguf_io import read_gguf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llamatools import llama_imatrix

ROOT = Path(__file__).resolve().parents[1]
M = "gemma-3-270m"
RUN_TIMEOUT = 900
#: the config file the test writes: the demo's own, with the changes of :func:`smaller`
CONFIG = "demo-small.yaml"
#: chunks collected of each of the demo's datasets, one per shard
CHUNKS_PER_DATASET = 2
EVAL_CHUNKS = 2
N_CTX = 512  # the demo config's collect.n_ctx, left as it is
LLAMA_FTYPE_Q4_K_M = 15  # llama.h's LLAMA_FTYPE_MOSTLY_Q4_K_M, in general.file_type
TARGETS = (
    f"results/{M}/imatrix.gguf",
    f"results/{M}/quant/{M}-Q4_K_M.gguf",
    f"results/{M}/eval/summary.parquet",
)
#: not copied from the checkout's root: environments, caches, earlier results
_NOT_COPIED = frozenset(
    {
        ".git",
        ".venv",
        "results",
        "resources",
        "logs",
        ".snakemake",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
        "report.html",
    }
)


def _not_copied(directory: str, names: list[str]) -> set[str]:
    top = Path(directory) == ROOT
    return {
        n
        for n in names
        if (top and n in _NOT_COPIED) or n == "__pycache__" or n.endswith(".egg-info")
    }


pytestmark = pytest.mark.timeout(RUN_TIMEOUT + 300)


def smaller(cfg: dict[str, Any]) -> dict[str, Any]:
    """The demo config with two chunks per dataset, one quant type and no plans, no extra
    imatrix formats and two evaluation chunks; everything else (model, datasets, n_ctx, shards)
    as the demo has it. A full copy rather than ``--config key=value``: Snakemake reads
    nested ``--config`` values as strings, which the schema rightly refuses."""
    for ds in cfg["datasets"].values():
        ds["chunks"] = CHUNKS_PER_DATASET
    cfg["output_formats"] = ["gguf"]
    # no plans: planning calibrates a dozen models (tests/test_workflow_plan.py covers
    # the planned quants on the tiny model, benchmarks/plan.py on this one)
    cfg["quantize"].update(types=["Q4_K_M"], compare_without_imatrix=False, plans=[])
    cfg["evaluate"]["chunks"] = EVAL_CHUNKS
    return cfg


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the checkout in which the demo ran (the requested targets only)."""
    checkout = tmp_path_factory.mktemp("demo") / "checkout"
    shutil.copytree(ROOT, checkout, ignore=_not_copied, symlinks=True)
    cfg = yaml.safe_load((checkout / "config" / "config.yaml").read_text(encoding="utf-8"))
    (checkout / CONFIG).write_text(yaml.safe_dump(smaller(cfg), sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "-c2", "--configfile", CONFIG, "--", *TARGETS]
    proc = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return checkout


def test_demo_outputs_exist_and_are_sane(demo_run: Path) -> None:
    for t in TARGETS:
        assert (demo_run / t).is_file(), t
    datasets = yaml.safe_load((demo_run / CONFIG).read_text(encoding="utf-8"))["datasets"]
    shards = sorted((demo_run / f"results/{M}/shards").rglob("*.gguf"))
    assert [p.relative_to(demo_run / f"results/{M}/shards").as_posix() for p in shards] == [
        f"{d}/{s}.gguf" for d in sorted(datasets) for s in range(CHUNKS_PER_DATASET)
    ]
    assert {"prose", "technical", "generated"} <= set(datasets)
    assert (demo_run / f"results/{M}/generated/generated.jsonl").is_file()
    chunks = CHUNKS_PER_DATASET * len(datasets)
    assert not list((demo_run / "results").rglob("*.checkpoint"))
    im = read_imatrix(demo_run / f"results/{M}/imatrix.gguf")
    assert im.chunk_count == chunks
    assert im.chunk_size == N_CTX
    for name, e in im.entries.items():
        # a dense model: every matrix saw every token of every chunk
        assert e.counts.tolist() == [chunks * N_CTX], name
        assert np.isfinite(e.values).all() and (e.values >= 0).all() and e.values.any(), name
        assert e.sums is not None and np.isfinite(e.sums).all(), name


def test_demo_imatrix_covers_what_llama_imatrix_covers(demo_run: Path, llama_bin: Path) -> None:
    """Same tensors as llama-imatrix on the same F16 base (one chunk of the same text)."""
    base = demo_run / f"results/{M}/base/{M}-F16.gguf"
    ref = demo_run / "llama-imatrix.gguf"
    text = demo_run / "data" / "calibration" / "prose.txt"
    llama_imatrix(llama_bin, "-m", base, "-f", text, "-o", ref, "-c", N_CTX, "--chunks", 1)
    theirs = set(read_imatrix(ref).entries)
    ours = set(read_imatrix(demo_run / f"results/{M}/imatrix.gguf").entries)
    assert theirs, "llama-imatrix collected nothing"
    assert ours == theirs, (
        f"only ours: {sorted(ours - theirs)}; only theirs: {sorted(theirs - ours)}"
    )


def test_demo_quant_loads_and_differs_from_the_base(demo_run: Path) -> None:
    import pandas as pd

    from imatrix.llama_api import load_model, tokenize

    quant = demo_run / f"results/{M}/quant/{M}-Q4_K_M.gguf"
    assert read_gguf(quant, load_data=False).get("general.file_type") == LLAMA_FTYPE_Q4_K_M
    with load_model(quant) as model:
        text = b"The old house stood at the end of the road."
        assert len(tokenize(model, text, add_special=True, parse_special=False)) > 5
    summary = pd.read_parquet(demo_run / f"results/{M}/eval/summary.parquet")
    assert summary["is_base"].tolist() == [True, False]
    row = summary[~summary["is_base"]].iloc[0]
    assert row["type"] == "Q4_K_M" and bool(row["imatrix"])
    assert row["n_chunks"] == EVAL_CHUNKS and row["n_ctx"] == N_CTX
    for col in ("kld_mean", "kld_median", "kld_p99", "kld_max"):
        assert math.isfinite(row[col]) and row[col] > 0, (col, row[col])
    assert math.isfinite(row["ppl"]) and row["ppl"] > 1
    assert 0 < row["same_top_p"] < 1
