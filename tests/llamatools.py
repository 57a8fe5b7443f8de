"""Running llama.cpp's reference tools from tests, with their output kept for failures."""

from __future__ import annotations

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
