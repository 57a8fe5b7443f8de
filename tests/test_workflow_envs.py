"""The workflow's conda environments pin what pyproject.toml pins.

Why: a job under ``--software-deployment-method conda`` imports this checkout's library
with the environment's packages; if an env drifts from pyproject.toml (another
llama-cpp-python, another gguf), the workflow would compute with a llama.cpp that the
tests never saw.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENVS = sorted((ROOT / "workflow" / "envs").glob("*.yaml"))
#: dependencies of the Snakemake process itself, not of the jobs
DRIVER_ONLY = re.compile(r"^snakemake")


def _name(spec: str) -> str:
    return re.split(r"[<>=!~ \[;]", spec, maxsplit=1)[0].strip().lower().replace("_", "-")


def project_pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {_name(d): d.replace(" ", "") for d in deps if not DRIVER_ONLY.match(_name(d))}


def env_pins(path: Path) -> dict[str, str]:
    env = yaml.safe_load(path.read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    # per-requirement options (--config-settings=...) follow the specifier
    return {_name(s): s.split(" --", 1)[0].replace(" ", "") for s in pip}


def test_envs_exist() -> None:
    assert {p.name for p in ENVS} >= {"cpu.yaml", "cuda.yaml"}


@pytest.mark.parametrize("env", ENVS, ids=lambda p: p.name)
def test_env_pins_agree_with_pyproject(env: Path) -> None:
    assert env_pins(env) == project_pins()


def test_cuda_env_builds_with_cuda() -> None:
    env = yaml.safe_load((ROOT / "workflow" / "envs" / "cuda.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    llama = next(s for s in pip if _name(s) == "llama-cpp-python")
    assert "--config-settings=cmake.args=-DGGML_CUDA=on" in llama
    assert env["variables"]["CMAKE_ARGS"] == "-DGGML_CUDA=on"
    assert any(str(d).startswith("cuda-nvcc") for d in env["dependencies"])


def test_rules_use_the_envs() -> None:
    """Every rule names a conda env through common.smk's conda_env(), whose files exist."""
    rules = (ROOT / "workflow" / "rules").glob("*.smk")
    text = "\n".join(p.read_text() for p in rules)
    n_rules = len(re.findall(r"^(?:rule|checkpoint) \w+:", text, re.M))
    assert n_rules == text.count("conda:\n        conda_env(")
    common = (ROOT / "workflow" / "rules" / "common.smk").read_text()
    assert 'f"../envs/{build}.yaml"' in common
