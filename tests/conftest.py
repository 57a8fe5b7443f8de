"""Shared fixtures: tiny generated models, calibration text, and llama.cpp's own tools.

The llama.cpp binaries come from scripts/build-llama-tools.sh (built from the source
vendored in the pinned llama-cpp-python sdist, cached under ~/.cache); the fixture
builds them when they are missing rather than skipping: parity is the point.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tinymodels import DENSE, MOE, sample_text, write_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def llama_bin() -> Path:
    """Directory holding llama-imatrix, llama-quantize and llama-perplexity."""
    env = os.environ.get("IMATRIX_LLAMA_BIN")
    if env:
        return Path(env)
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-llama-tools.sh")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def dense_model(models_dir: Path) -> Path:
    return write_tiny_model(models_dir / "tiny-dense.gguf", DENSE, seed=1)


@pytest.fixture(scope="session")
def moe_model(models_dir: Path) -> Path:
    return write_tiny_model(models_dir / "tiny-moe.gguf", MOE, seed=2)


@pytest.fixture(params=["dense", "moe"])
def tiny_model(request: pytest.FixtureRequest, dense_model: Path, moe_model: Path) -> Path:
    """Each test using this runs once on the dense and once on the MoE model."""
    return dense_model if request.param == "dense" else moe_model


@pytest.fixture(scope="session")
def calib_text(models_dir: Path) -> Path:
    """About 3000 tokens of text: enough for several 128-token chunks."""
    p = models_dir / "calib.txt"
    p.write_text(sample_text(2500, seed=3), encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def calib_text2(models_dir: Path) -> Path:
    p = models_dir / "calib2.txt"
    p.write_text(sample_text(1500, seed=4), encoding="utf-8")
    return p
