"""Atomic writes: temporary file beside the target, fsync, rename, fsync of the directory.

Why every writer goes through here: a killed or failed run must never leave a partial
file under a final name (Snakemake and resumed runs would take it for a result), and
must never damage a file a user already had. Temporary files are named after their
writer's pid and host, so a later writer on the same host can remove what a killed
one left behind.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from imatrix import faults
from imatrix.errors import ImatrixError

log = logging.getLogger(__name__)


def atomic_write(path: str | Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that no reader ever sees a partial file.

    Temporary file in the same directory, fsync, rename over the target, fsync of the
    directory. On any failure the temporary file is removed and the target is left as
    it was (a previous file under that name survives untouched).
    """
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        view, half = memoryview(payload), len(payload) // 2
        fh.write(view[:half])
        if faults.ENV in os.environ:  # crash tests: kill with half the bytes written
            fh.flush()
            faults.point("write.partial", path)
        fh.write(view[half:])


_HOST = socket.gethostname()


def _remove_dead_writers_temporaries(target: Path, parent: Path) -> None:
    """Remove the temporary files of ``target`` whose writers died (killed half-way):
    a temporary file is named after its writer's pid and host, and one of this host
    whose pid no longer exists can only be garbage. Files of other hosts (a shared file
    system) are left to :func:`remove_stale_temporaries` under a lock."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)@(.+)\.[^.]*\.tmp$")
    with contextlib.suppress(OSError):
        for p in parent.glob(f".{glob.escape(target.name)}.*@*.tmp"):
            m = pattern.match(p.name)
            if m is None or m.group(2) != _HOST or int(m.group(1)) == os.getpid():
                continue
            try:
                os.kill(int(m.group(1)), 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError):
                    p.unlink()
                    log.info("removed %s, left by a writer that was killed", p)
            except OSError:
                pass  # alive (another user's process) or unknowable: leave it


def _temp_beside(target: Path) -> tuple[Path, str]:
    """A new empty temporary file in ``target``'s directory, with clear errors when
    that directory is missing or not writable."""
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise ImatrixError(f"{target}: output directory {parent} does not exist")
    if target.is_dir():
        raise ImatrixError(f"{target}: is a directory")
    _remove_dead_writers_temporaries(target, parent)
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{target.name}.{os.getpid()}@{_HOST}.", suffix=".tmp", dir=parent
        )
    except PermissionError as exc:
        raise ImatrixError(
            f"{target}: cannot write to directory {parent} (permission denied)"
        ) from exc
    except OSError as exc:
        raise ImatrixError(f"{target}: cannot create a file in {parent}: {exc.strerror}") from exc
    os.close(fd)
    return parent, tmp


def check_writable(path: str | Path) -> None:
    """Fail now, not after hours of work, if ``path`` could not be written at the end
    (missing or read-only directory, a directory in the way)."""
    _parent, tmp = _temp_beside(Path(path))
    os.unlink(tmp)


def remove_stale_temporaries(path: str | Path) -> int:
    """Remove temporary files that killed writers of ``path`` left behind (the
    ``.<name>.*.tmp`` files of :func:`atomic_output`); returns how many.

    Only for a caller that knows it is the sole writer of ``path`` (e.g. holds
    :func:`imatrix.writelock.exclusive_writer`): another live writer's temporary file
    would be removed under it.
    """
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    n = 0
    for p in parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    return n


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it into place.

    For writers that need a file name (llama.cpp's quantizer, pyarrow): they write the
    temporary file, and only a complete file ever appears under the final name.
    """
    target = Path(path)
    parent, tmp = _temp_beside(target)
    try:
        yield tmp
        faults.point("write.complete", target)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        faults.point("write.renamed", target)
        with contextlib.suppress(OSError):
            dfd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if exc.errno == errno.ENOSPC:
            raise ImatrixError(f"{target}: no space left on device while writing") from exc
        if exc.errno == errno.EFBIG:
            raise ImatrixError(
                f"{target}: write failed: file too large (file size limit, see ulimit -f)"
            ) from exc
        raise ImatrixError(f"{target}: write failed: {exc.strerror or exc}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
