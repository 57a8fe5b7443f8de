"""Content hashes of files: the provenance that ties an imatrix to its model and text.

Why a module of its own: tokenize, collect and the demo's model assembly all record or
verify sha256 digests, and none of them should import another's module for it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from imatrix.errors import ImatrixError

#: bytes read at a time (models can be far larger than memory)
_BLOCK = 1 << 20


def sha256_file(path: str | Path, block: int = _BLOCK) -> str:
    """Hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(block):
                h.update(chunk)
    except FileNotFoundError as exc:
        raise ImatrixError(f"{path}: no such file") from exc
    except OSError as exc:
        raise ImatrixError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return h.hexdigest()
