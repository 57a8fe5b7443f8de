"""``skip_or_fail``: a skip on a developer's machine, a failure naming the cause in CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

_PROBE = """
from ci import skip_or_fail

def test_needs_a_service():
    skip_or_fail("no frobnicator here")
"""


def _run_probe(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_probe.py").write_text(_PROBE, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "test_probe.py"]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ci", ["true", "1", "yes", "TRUE"])
def test_fails_under_ci(tmp_path: Path, ci: str) -> None:
    proc = _run_probe(tmp_path, ci)
    assert proc.returncode == 1, proc.stdout
    assert "1 failed" in proc.stdout
    assert "CI=true and this test cannot run: no frobnicator here" in proc.stdout


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_skips_elsewhere_saying_why(tmp_path: Path, ci: str | None) -> None:
    proc = _run_probe(tmp_path, ci)
    assert proc.returncode == 0, proc.stdout
    assert "1 skipped" in proc.stdout
    assert "no frobnicator here" in proc.stdout
