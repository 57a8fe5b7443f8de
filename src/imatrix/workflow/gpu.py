"""One GPU per concurrent job on one machine.

Snakemake's ``--resources gpu=N`` bounds how many GPU jobs run at once but does not say
which device each gets; without this, all of them would pile onto device 0. Each device
is a slot: a lock file taken with ``flock`` (atomic, and released by the kernel when a
killed job's process dies, so no stale claims). The claimed index becomes
``CUDA_VISIBLE_DEVICES``. On SLURM the scheduler sets ``CUDA_VISIBLE_DEVICES`` itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from imatrix.errors import ImatrixError

log = logging.getLogger(__name__)

#: Overrides the number of GPUs the driver lists (tests, or a machine shared with others).
SLOTS_ENV = "IMATRIX_GPU_SLOTS"
#: Where the NVIDIA driver lists the devices of this machine.
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


def gpu_slot_count() -> int:
    """GPUs this machine has: ``IMATRIX_GPU_SLOTS`` if set, else the NVIDIA devices the
    driver lists (0 without a driver)."""
    env = os.environ.get(SLOTS_ENV)
    if env is not None:
        try:
            return max(0, int(env))
        except ValueError:
            raise ImatrixError(f"{SLOTS_ENV} must be a number, got '{env}'") from None
    return len(list(NVIDIA_GPUS.iterdir())) if NVIDIA_GPUS.is_dir() else 0


def default_slot_dir() -> Path:
    """The lock files' directory: per user, so users of one machine do not collide."""
    return Path(tempfile.gettempdir()) / f"imatrix-gpu-slots-{os.getuid()}"


def _take_free_slot(slot_dir: Path, n: int) -> tuple[int, int] | None:
    """(slot, locked fd) of the first slot no other process holds, or None."""
    for slot in range(n):
        fd = os.open(slot_dir / f"gpu{slot}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return slot, fd
    return None


def _wait_for_slot(slot_dir: Path, n: int, poll: float, timeout: float | None) -> tuple[int, int]:
    start = time.monotonic()
    waited = False
    while True:
        got = _take_free_slot(slot_dir, n)
        if got is not None:
            return got
        if timeout is not None and time.monotonic() - start > timeout:
            raise ImatrixError(f"no free GPU slot among {n} in {slot_dir} after {timeout:.0f} s")
        if not waited:
            log.info("all %d GPU slots busy; waiting for one", n)
            waited = True
        time.sleep(poll)


@contextlib.contextmanager
def claim_gpu(
    n_slots: int | None = None,
    *,
    slot_dir: str | Path | None = None,
    poll: float = 0.5,
    timeout: float | None = None,
) -> Iterator[int | None]:
    """Hold one GPU of this machine for the duration of the block.

    When ``CUDA_VISIBLE_DEVICES`` is already set (SLURM's GPU allocation, or a user's
    choice) it is respected and nothing is claimed; with no GPUs (``n_slots`` 0, or none
    found) nothing is claimed either. Yields the slot, or None.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        log.info("using CUDA_VISIBLE_DEVICES=%s as given", os.environ["CUDA_VISIBLE_DEVICES"])
        yield None
        return
    n = gpu_slot_count() if n_slots is None else n_slots
    if n <= 0:
        yield None
        return
    d = Path(slot_dir) if slot_dir is not None else default_slot_dir()
    d.mkdir(parents=True, exist_ok=True)
    slot, fd = _wait_for_slot(d, n, poll, timeout)
    os.environ["CUDA_VISIBLE_DEVICES"] = str(slot)
    log.info("claimed GPU slot %d of %d (CUDA_VISIBLE_DEVICES=%d)", slot, n, slot)
    try:
        yield slot
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
