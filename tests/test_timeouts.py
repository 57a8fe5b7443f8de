"""A hang fails one test instead of stalling CI: every test runs under pytest-timeout,
and every subprocess a test starts (or waits for) has its own timeout.

Read from the test sources, so a new ``subprocess.run`` without a timeout fails here
with its file and line rather than hanging a CI run some day.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
#: subprocess functions that wait for the child
_RUNNERS = {"run", "call", "check_call", "check_output"}
#: Popen methods that wait for the child
_WAITERS = {"wait", "communicate"}


def _has_timeout(call: ast.Call) -> bool:
    if any(k.arg == "timeout" for k in call.keywords):
        return True
    attr = call.func.attr if isinstance(call.func, ast.Attribute) else ""
    return attr in _WAITERS and len(call.args) >= (1 if attr == "wait" else 2)


def _waits_without_timeout(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        f = node.func
        is_runner = (
            isinstance(f.value, ast.Name) and f.value.id == "subprocess" and f.attr in _RUNNERS
        )
        if (is_runner or f.attr in _WAITERS) and not _has_timeout(node):
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_every_subprocess_in_the_tests_has_a_timeout() -> None:
    missing = [m for p in sorted(TESTS.glob("*.py")) for m in _waits_without_timeout(p)]
    assert not missing, "no timeout:\n" + "\n".join(missing)


def test_every_test_runs_under_pytest_timeout(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.hasplugin("timeout")
    assert float(pytestconfig.getini("timeout")) > 0
