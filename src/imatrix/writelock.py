"""One writer per output: an exclusive lock beside a long computation's output.

Why: when Snakemake dies, the jobs it started can live on (a SLURM job keeps running
on its node; a local job is orphaned). Rerunning the workflow then starts a second
job for the same shard, and the two would write the same checkpoint and output. A
collector holds ``<output>.lock`` (``flock``) for as long as it runs; a second
collector for the same output waits until the first is gone, then resumes from
whatever checkpoint it left, or starts over if it finished. The kernel drops the lock
when its holder dies however it dies (SIGKILL included), so there are no stale locks
to clean up; the file itself is removed by the holder when it is done.

``flock`` works across nodes on NFS (Linux emulates it with POSIX locks) and on
Lustre/GPFS mounted with lock support; where the file system has no locks at all the
collector runs unlocked, with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from imatrix.errors import ImatrixError

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"

_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def lock_path(output: str | Path) -> Path:
    return Path(str(output) + LOCK_SUFFIX)


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, 256, 0).decode("utf-8", errors="replace").strip()
        if text:
            return text
    return "another process"


def _acquire(path: Path, output: str | Path) -> int | None:
    """The locked descriptor of ``path``, or None where the file system has no locks."""
    waited = False
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ImatrixError(f"{path}: cannot create the lock file: {exc.strerror}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited:
                    log.warning(
                        "%s is being written by %s; waiting for it to finish", output, _holder(fd)
                    )
                    waited = True
                t0 = time.monotonic()
                fcntl.flock(fd, fcntl.LOCK_EX)
                log.info("lock on %s obtained after %.1f s", output, time.monotonic() - t0)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _NO_LOCKS:
                raise ImatrixError(f"{path}: cannot lock: {exc.strerror}") from exc
            log.warning("%s: file system without locks; nothing prevents a second writer", path)
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None
        # the previous holder may have removed the file between our open and our lock:
        # then we hold a lock on a name that no longer exists, and must start again
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def exclusive_writer(output: str | Path) -> Iterator[None]:
    """Hold ``<output>.lock`` for the duration; wait (saying who holds it) if it is taken."""
    path = lock_path(output)
    fd = _acquire(path, output)
    if fd is None:
        yield
        return
    try:
        with contextlib.suppress(OSError):  # who holds it, for the waiting side's message
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


__all__ = ["LOCK_SUFFIX", "exclusive_writer", "lock_path"]
