"""Running llama.cpp's reference tools from tests, with their output kept for failures."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path


def run_tool(
    llama_bin: Path, tool: str, *args: object, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``llama_bin/tool args...``; on failure raise with the tool's own output."""
    cmd = [str(llama_bin / tool), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def llama_imatrix(llama_bin: Path, *args: object) -> subprocess.CompletedProcess[str]:
    return run_tool(llama_bin, "llama-imatrix", *args)


def run_until_logged(
    llama_bin: Path, tool: str, *args: object, pattern: str, returncode: int, tries: int = 100
) -> tuple[subprocess.CompletedProcess[str], re.Match[str]]:
    """Run a tool until its output contains ``pattern``; every run must exit with
    ``returncode``.

    llama.cpp's tools log through an asynchronous logger that often loses its last
    lines when the process exits early (after an error), so one run may print nothing
    at all; the exit code is reliable, the text needs retries (each run takes ms). A
    run that exits otherwise fails at once: a retry must not hide a crash.
    """
    proc = None
    for attempt in range(1, tries + 1):
        proc = run_tool(llama_bin, tool, *args, check=False)
        if proc.returncode != returncode:
            raise AssertionError(
                f"{tool} run {attempt} exited {proc.returncode}, expected {returncode}:\n"
                f"{proc.stderr[-2000:]}"
            )
        m = re.search(pattern, proc.stderr + proc.stdout)
        if m:
            return proc, m
    assert proc is not None
    raise AssertionError(f"{tool} never logged {pattern!r} in {tries} runs:\n{proc.stderr[-2000:]}")
