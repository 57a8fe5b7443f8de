"""Locate llama.cpp's reference tools and check they are the llama.cpp we are built on.

The parity tests and the benchmarks compare our results with ``llama-imatrix``,
``llama-quantize`` and ``llama-perplexity``. Such a comparison proves something only
when the tools come from exactly the llama.cpp source that the pinned llama-cpp-python
vendors (the same kernels, keys and file layouts); tools from another checkout would
make every mismatch, or every match, meaningless. So the directory is found in one
way everywhere (an explicit path, else ``$IMATRIX_LLAMA_BIN``, else
``scripts/build-llama-tools.sh``, which builds them from the pinned sdist into a
cache), and :func:`check_pinned` compares the commit the tools report
(``--version``) with the commit compiled into the llama.cpp library that
``llama_cpp`` loads.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import subprocess
import tempfile
from pathlib import Path

from imatrix.errors import ImatrixError

log = logging.getLogger(__name__)

#: environment variable naming the directory that holds the tools
ENV_BIN = "IMATRIX_LLAMA_BIN"
#: the tools the tests and benchmarks run
TOOLS = ("llama-imatrix", "llama-quantize", "llama-perplexity")
#: builds the tools from the pinned llama-cpp-python sdist (present in a checkout only)
BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build-llama-tools.sh"
#: seconds a first build may take (it compiles llama.cpp; later calls hit the cache)
BUILD_TIMEOUT = 3600
#: seconds a tool may take to print its version
VERSION_TIMEOUT = 60
#: what llama.cpp prints for ``--version``: "version: 0.5.0-dev (build 1, commit 0c1e570)"
_VERSION_LINE = re.compile(r"version: (?P<version>\S+) \(build \d+, commit (?P<commit>[^)\s]+)\)")
_UNKNOWN = "unknown"
#: git's shortest abbreviation of a commit hash
_MIN_ABBREV = 7


def tools_dir(explicit: str | Path | None = None) -> Path:
    """The directory holding :data:`TOOLS`: ``explicit``, else ``$IMATRIX_LLAMA_BIN``,
    else the (cached) output of ``scripts/build-llama-tools.sh``."""
    given = explicit or os.environ.get(ENV_BIN)
    if given:
        return Path(given)
    if not BUILD_SCRIPT.is_file():
        raise ImatrixError(
            f"{BUILD_SCRIPT}: not found (not a checkout); set {ENV_BIN} to the directory "
            f"holding {', '.join(TOOLS)}"
        )
    log.info("locating llama.cpp's tools with %s (builds them once)", BUILD_SCRIPT)
    try:
        out = subprocess.run(
            ["bash", str(BUILD_SCRIPT)],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
            timeout=BUILD_TIMEOUT,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise ImatrixError(f"{BUILD_SCRIPT} failed ({exc}); its output is above") from None
    return Path(out.stdout.strip().splitlines()[-1])


def _version_probe(tool: str, scratch: Path) -> tuple[list[str], int]:
    """Arguments that make ``tool`` print its build line, and the exit code they give.
    llama-quantize has no ``--version``: it prints the line before loading its input,
    so a missing input (in an empty scratch directory: nothing is written) shows it."""
    if tool == "llama-quantize":
        return [str(scratch / "missing.gguf"), str(scratch / "out.gguf"), "COPY"], 1
    return ["--version"], 0


def tool_build(bin_dir: Path, tool: str = TOOLS[0]) -> tuple[str, str]:
    """(llama.cpp version, commit) that ``tool`` reports (``--version`` or its banner)."""
    exe = bin_dir / tool
    if not os.access(exe, os.X_OK):
        raise ImatrixError(f"{exe}: no such executable (is {ENV_BIN} right?)")
    with tempfile.TemporaryDirectory(prefix="imatrix-probe-") as scratch:
        args, rc = _version_probe(tool, Path(scratch))
        proc = subprocess.run(
            [str(exe), *args], capture_output=True, text=True, timeout=VERSION_TIMEOUT
        )
    m = _VERSION_LINE.search(proc.stdout + proc.stderr)
    if proc.returncode != rc or m is None:
        raise ImatrixError(
            f"{exe} {' '.join(args)} exited {proc.returncode}"
            f"{'' if m else ' without a version line'}: "
            f"{(proc.stderr or proc.stdout).strip()[-300:]!r}"
        )
    return m.group("version"), m.group("commit")


def library_build() -> tuple[str, str]:
    """(llama.cpp version, ggml commit) compiled into the libraries ``llama_cpp`` loads."""
    import llama_cpp
    from llama_cpp import _ggml

    version = llama_cpp.llama_cpp._lib.llama_version
    commit = _ggml.libggml.ggml_commit
    for fn in (version, commit):
        fn.argtypes = []
        fn.restype = ctypes.c_char_p
    return version().decode(), commit().decode()


def check_pinned(bin_dir: Path) -> None:
    """Raise unless every tool in ``bin_dir`` reports the llama.cpp version and commit of
    the library llama-cpp-python loads (a commit built from a modified tree may carry
    ``-dirty``; the commit itself must match)."""
    lib_version, lib_commit = library_build()
    for tool in TOOLS:
        version, commit = tool_build(bin_dir, tool)
        theirs, ours = commit.removesuffix("-dirty"), lib_commit.removesuffix("-dirty")
        if _UNKNOWN in (theirs, ours):
            raise ImatrixError(
                f"{bin_dir / tool}: cannot tell which llama.cpp it is (tool commit {commit!r}, "
                f"llama-cpp-python's {lib_commit!r}); build it with scripts/build-llama-tools.sh"
            )
        if version != lib_version or not _same_commit(theirs, ours):
            raise ImatrixError(
                f"{bin_dir / tool}: llama.cpp {version} commit {commit}, but llama-cpp-python "
                f"loads {lib_version} commit {lib_commit}; rebuild the tools from the pinned "
                "sdist (scripts/build-llama-tools.sh) or point "
                f"{ENV_BIN} at such a build"
            )


def _same_commit(a: str, b: str) -> bool:
    """Abbreviated hashes of one commit (git may abbreviate to different lengths)."""
    n = min(len(a), len(b))
    return n >= _MIN_ABBREV and a[:n] == b[:n]


def pinned_tools_dir(explicit: str | Path | None = None) -> Path:
    """:func:`tools_dir`, checked with :func:`check_pinned`."""
    bin_dir = tools_dir(explicit)
    check_pinned(bin_dir)
    return bin_dir
