"""llama.cpp's reference tools are found one way and must be the pinned llama.cpp.

The fake tools here print what llama.cpp's ``--version`` prints; only the commit or the
version differs from the library llama-cpp-python loads, and that alone must stop a run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imatrix.errors import ImatrixError
from imatrix.reference import ENV_BIN, TOOLS, check_pinned, library_build, tools_dir


def fake_tools(d: Path, version: str, commit: str, rc: int = 0) -> Path:
    """Tools that print llama.cpp's build line; llama-quantize (no ``--version``) prints it
    and fails on its missing input, as the real one does, with exit code ``rc + 1``."""
    d.mkdir()
    for tool in TOOLS:
        exe = d / tool
        code = rc + 1 if tool == "llama-quantize" else rc
        exe.write_text(
            f'#!/bin/sh\necho "version: {version} (build 1, commit {commit})" >&2\nexit {code}\n'
        )
        exe.chmod(0o755)
    return d


def test_the_tools_in_use_are_the_pinned_build(llama_bin: Path) -> None:
    check_pinned(llama_bin)


def test_library_reports_a_real_commit() -> None:
    version, commit = library_build()
    assert version and commit.removesuffix("-dirty") != "unknown", (version, commit)


def test_a_matching_build_passes(tmp_path: Path) -> None:
    version, commit = library_build()
    check_pinned(fake_tools(tmp_path / "bin", version, commit.removesuffix("-dirty")))


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda v, c: (v, "0000000"), "commit 0000000"),
        (lambda v, c: ("0.0.1-dev", c), "llama.cpp 0.0.1-dev"),
        (lambda v, c: (v, "unknown"), "cannot tell which llama.cpp"),
    ],
    ids=["other-commit", "other-version", "unknown-commit"],
)
def test_another_build_is_refused(tmp_path: Path, change, needle: str) -> None:
    version, commit = change(*library_build())
    with pytest.raises(ImatrixError, match=needle):
        check_pinned(fake_tools(tmp_path / "bin", version, commit))


def test_a_tool_that_fails_or_is_missing_is_refused(tmp_path: Path) -> None:
    version, commit = library_build()
    with pytest.raises(ImatrixError, match="--version exited 3: "):
        check_pinned(fake_tools(tmp_path / "failing", version, commit, rc=3))
    with pytest.raises(ImatrixError, match="exited 0 without a version line"):
        check_pinned(fake_tools(tmp_path / "silent", "", ""))
    (fake_tools(tmp_path / "bin", version, commit) / "llama-quantize").unlink()
    with pytest.raises(ImatrixError, match="llama-quantize: no such executable"):
        check_pinned(tmp_path / "bin")


def test_explicit_directory_then_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_BIN, os.fspath(tmp_path / "env"))
    assert tools_dir(tmp_path / "arg") == tmp_path / "arg"
    assert tools_dir() == tmp_path / "env"
