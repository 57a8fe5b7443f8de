"""The workflow run the way a user runs it: from a checkout, with a config of their own.

The other workflow tests run this checkout's Snakefile with ``-s`` from a directory that
has no ``config/config.yaml``, so the demo config never takes part. A user runs from the
repository root, where the demo config is. These tests copy the checkout (workflow,
demo config, profiles, demo data, library) into a temporary directory, put the tiny
model and datasets under ``mine/`` beside it, and run the README's commands there:

- ``snakemake -c2 --configfile mine/config.yaml``: the user's config replaces the
  demo's (no demo model or dataset is planned), with or without
  ``--replace-workflow-config``, and the run gives the merged imatrix of the user's
  datasets only;
- ``snakemake -n`` and ``snakemake -n --configfile config/config.yaml changes.yaml``:
  the demo config still loads when no config file is given, and a file of changes named
  after it overrides it key by key.

tests/test_slurm.py runs the same checkout through the SLURM profile, where the job
processes re-read the Snakefile (the bug these tests guard against: Snakemake does not
pass ``--replace-workflow-config`` to them).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_workflow import job_counts, load_config, make_workdir

from imatrix.formats import read_imatrix

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[1]
#: what a checkout has that the workflow uses (tests, benchmarks and docs it does not)
CHECKOUT_PARTS = ("workflow", "config", "profiles", "data", "src")
#: the user's files, relative to the checkout root
USER_DIR = "mine"
USER_CONFIG = f"{USER_DIR}/config.yaml"
RUN_TIMEOUT = 600
M = "tiny"


def small_config() -> dict:
    """The tiny test config cut down to what shows which config ran: one dataset in
    two shards, one quant type, no evaluation."""
    cfg = load_config()
    cfg["datasets"] = {"alpha": cfg["datasets"]["alpha"]}
    cfg["collect"]["shards"] = 2
    cfg["output_formats"] = ["gguf"]
    cfg["quantize"] = {"types": ["Q4_K_M"], "compare_without_imatrix": False, "threads": 1}
    cfg["evaluate"]["text"] = None
    return cfg


def make_checkout(dest: Path, model: Path, config: dict) -> Path:
    """A copy of this checkout with the user's model, data and config under ``mine/``
    (paths in the config relative to the checkout root, as a user writes them)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".snakemake")
    for part in CHECKOUT_PARTS:
        shutil.copytree(ROOT / part, dest / part, ignore=ignore)
    cfg = yaml.safe_load(yaml.safe_dump(config))
    for m in cfg["models"].values():
        m["path"] = f"{USER_DIR}/{m['path']}"
    for d in cfg["datasets"].values():
        d["path"] = f"{USER_DIR}/{d['path']}"
    if cfg["evaluate"].get("text"):
        cfg["evaluate"]["text"] = f"{USER_DIR}/{cfg['evaluate']['text']}"
    make_workdir(dest / USER_DIR, model, cfg)
    assert (dest / "config" / "config.yaml").is_file()
    return dest


def snakemake(checkout: Path, *args: str) -> str:
    """``snakemake ARGS`` from the checkout root, no ``-s``: Snakemake finds the workflow
    itself, as it does for a user."""
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"snakemake {' '.join(args)} exited {proc.returncode}:\n{out}"
    return out


@pytest.fixture
def checkout(tmp_path: Path, dense_model: Path) -> Path:
    return make_checkout(tmp_path / "checkout", dense_model, small_config())


def test_user_config_replaces_the_demo(checkout: Path) -> None:
    expected = {
        "tokenize": 1,
        "collect": 2,
        "merge": 1,
        "stats": 1,
        "coverage": 1,
        "convergence": 1,
        "report_statistics": 1,
        "quantize": 1,
        "all": 1,
    }
    for extra in ((), ("--replace-workflow-config",)):
        out = snakemake(checkout, "-n", "-c2", *extra, "--configfile", USER_CONFIG)
        assert job_counts(out) == expected, out
        assert "gemma" not in out and "prose" not in out, out
    out = snakemake(checkout, "-c2", "--configfile", USER_CONFIG)
    merged = read_imatrix(checkout / f"results/{M}/imatrix.gguf")
    assert merged.datasets == ["alpha"]
    assert sorted(p.name for p in (checkout / f"results/{M}/shards").iterdir()) == ["alpha"]
    assert not (checkout / "results" / "gemma-3-270m").exists()


def test_demo_config_loads_without_a_config_file(checkout: Path) -> None:
    """No --configfile: the demo plans its own model and datasets. The README's way to
    change some keys of the demo: the demo config, then a file of changes, which
    overrides it key by key."""
    demo = yaml.safe_load((checkout / "config" / "config.yaml").read_text())
    out = snakemake(checkout, "-n", "-c2")
    counts = job_counts(out)
    assert counts["demo_model"] == 1 and counts["tokenize"] == len(demo["datasets"])
    assert counts["collect"] == len(demo["datasets"]) * demo["collect"]["shards"], out
    (checkout / "changes.yaml").write_text("collect:\n  shards: 1\n")
    out = snakemake(checkout, "-n", "-c2", "--configfile", "config/config.yaml", "changes.yaml")
    counts = job_counts(out)
    assert counts["demo_model"] == 1 and counts["collect"] == len(demo["datasets"]), out
    # the rest of the demo config is kept
    assert counts["quantize"] == len(demo["quantize"]["types"]), out
