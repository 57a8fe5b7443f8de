"""Snakemake itself killed during collection and during the merge, then rerun.

The workflow runs through the Snakemake command line with the local profile (what a
user runs), up to the merged imatrix of the test config (2 datasets x 3 shards). Each
scenario freezes the job of interest at a chosen moment with the library's crash hook
(``IMATRIX_FAULT=...=stop``: the job stops there, holding its files and its lock), so
that the kill lands where intended, then kills:

- the whole process group with SIGKILL (a node dies, an OOM kill): Snakemake's lock
  stays behind, a rerun is refused until ``snakemake --unlock``; the rerun resumes the
  shards from their checkpoints and redoes the merge;
- Snakemake alone with SIGKILL while its jobs live on (what happens to SLURM jobs when
  the Snakemake process dies): the rerun's job for a shard still being written waits
  for the orphan (one writer per shard), and the result is the same;
- Snakemake with SIGTERM (``kill``, ``scancel`` of the driver): it lets running jobs
  finish, starts no new ones and releases its lock; the rerun does the rest.

Every time, the shards and the merged imatrix are byte-identical to an uninterrupted
run's, and no checkpoint, temporary or lock file is left in ``results/``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_workflow import SHARDS, SNAKEMAKE, make_workdir

from imatrix import faults

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[1]
M = "tiny"
MERGED = f"results/{M}/imatrix.gguf"
OUTPUTS = [*SHARDS, MERGED]
TIMEOUT = 300


def _env(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    if fault:
        env[faults.ENV] = fault
    return env


def command(*extra: str) -> list[str]:
    """The user's command: the local profile (two cores, so that two collect jobs run
    at a time on any machine)."""
    return [
        *SNAKEMAKE,
        "--profile",
        str(ROOT / "profiles" / "local"),
        "--cores",
        "2",
        *extra,
        "--configfile",
        "config.yaml",
    ]


def snakemake(wd: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        command(*extra), cwd=wd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def start(wd: Path, fault: str, *extra: str) -> subprocess.Popen[str]:
    """Snakemake in a process group of its own (its jobs inherit it)."""
    return subprocess.Popen(
        command(MERGED, *extra),
        cwd=wd,
        env=_env(fault),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def jobs(wd: Path, script: str) -> dict[int, str]:
    """pid -> state of the processes running ``script`` (e.g. 'collect') for ``wd``."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().decode(errors="replace")
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if str(wd) in cmd and f".{script}.py" in cmd:
            out[int(p.name)] = state
    return out


def wait_for(cond, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"snakemake ended while waiting for {what}:\n{proc.stdout.read()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def stopped(wd: Path, script: str, n: int = 1):
    return lambda: sum(s == "T" for s in jobs(wd, script).values()) >= n


def gone(pids) -> bool:
    return not any(Path(f"/proc/{p}").exists() for p in pids)


def kill_group(proc: subprocess.Popen[str]) -> str:
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    return out


def unlock_and_rerun(wd: Path) -> str:
    """After a SIGKILL: the rerun is refused until --unlock, then completes."""
    refused = snakemake(wd, MERGED, check=False)
    assert refused.returncode != 0
    assert "Directory cannot be locked" in refused.stdout + refused.stderr
    snakemake(wd, "--unlock")
    done = snakemake(wd, MERGED)
    return done.stdout + done.stderr


def assert_same_outputs(wd: Path, reference: dict[str, bytes]) -> None:
    for rel in OUTPUTS:
        assert (wd / rel).read_bytes() == reference[rel], rel
    junk = [
        p.name
        for p in (wd / "results").rglob("*")
        if p.name.endswith((".checkpoint", ".tmp", ".lock"))
    ]
    assert junk == []


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dense_model) -> dict[str, bytes]:
    wd = make_workdir(tmp_path_factory.mktemp("wfk") / "ref", dense_model)
    snakemake(wd, MERGED)
    return {rel: (wd / rel).read_bytes() for rel in OUTPUTS}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, dense_model) -> Path:
    """One working directory for the scenarios in turn: each deletes what it redoes."""
    return make_workdir(tmp_path_factory.mktemp("wfk") / "w", dense_model)


def forget(wd: Path, *rels: str) -> None:
    """Bring ``wd`` up to date (should an earlier scenario have failed), then delete
    ``rels`` so that the next run redoes them."""
    if not all((wd / rel).exists() for rel in OUTPUTS):
        snakemake(wd, MERGED)
    for rel in rels:
        (wd / rel).unlink()


def test_node_dies_during_collection(workdir, reference):
    """Everything SIGKILLed while two collect jobs sit right after their first
    checkpoint: the rerun resumes them from it."""
    proc = start(workdir, "collect.checkpointed@1=stop")
    try:
        wait_for(stopped(workdir, "collect", 2), "two collect jobs at a checkpoint", proc)
    finally:
        kill_group(proc)
    ckpts = sorted(p.name for p in (workdir / "results").rglob("*.checkpoint"))
    assert len(ckpts) == 2
    assert not (workdir / MERGED).exists()
    unlock_and_rerun(workdir)
    resumed = [p for p in (workdir / "logs").rglob("*.log") if "resuming from" in p.read_text()]
    assert len(resumed) == 2
    assert_same_outputs(workdir, reference)


def test_node_dies_during_merge(workdir, reference):
    """Everything SIGKILLed while the merge's output is complete in its temporary
    file but not yet renamed: no merged imatrix exists, the rerun merges again."""
    forget(workdir, MERGED)
    proc = start(workdir, f"write.complete:{Path(MERGED).name}=stop")
    try:
        wait_for(stopped(workdir, "merge"), "the merge job to stop before its rename", proc)
    finally:
        kill_group(proc)
    assert not (workdir / MERGED).exists()
    assert list((workdir / MERGED).parent.glob(".imatrix.gguf.*.tmp"))  # the killed writer's
    unlock_and_rerun(workdir)
    assert_same_outputs(workdir, reference)


def test_snakemake_dies_while_its_jobs_live_on(workdir, reference):
    """Snakemake alone SIGKILLed; its two collect jobs (frozen after a checkpoint, as a
    SLURM job would be running on) outlive it. The rerun's jobs for those shards wait
    for them instead of writing the same files at the same time."""
    forget(workdir, MERGED, *[s for s in SHARDS if "/alpha/" in s])
    proc = start(workdir, "collect.checkpointed@1=stop")
    try:
        wait_for(stopped(workdir, "collect", 2), "two collect jobs at a checkpoint", proc)
        orphans = sorted(jobs(workdir, "collect"))
        proc.send_signal(signal.SIGKILL)  # snakemake only, not its group
        proc.communicate(timeout=TIMEOUT)
    except BaseException:
        kill_group(proc)
        raise
    rerun = None
    try:
        assert sorted(jobs(workdir, "collect")) == orphans  # alive, still frozen
        snakemake(workdir, "--unlock")
        rerun = subprocess.Popen(
            command(MERGED),
            cwd=workdir,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

        def waiting() -> list[Path]:
            logs = (workdir / "logs" / M / "collect" / "alpha").glob("*.log")
            return [p for p in logs if "waiting for it to finish" in p.read_text()]

        wait_for(lambda: len(waiting()) == 2, "the rerun's jobs to wait for the orphans", rerun)
        for p in waiting():
            assert any(f"pid {pid} on " in p.read_text() for pid in orphans), p.read_text()
        assert not any((workdir / s).exists() for s in SHARDS if "/alpha/" in s)
        for pid in orphans:
            os.kill(pid, signal.SIGCONT)
        out, _ = rerun.communicate(timeout=TIMEOUT)
        assert rerun.returncode == 0, out
        wait_for(lambda: gone(orphans), "the orphaned jobs to end")
    finally:
        for pid in orphans:
            if not gone([pid]):
                os.kill(pid, signal.SIGKILL)
        if rerun is not None and rerun.poll() is None:
            rerun.kill()
            rerun.communicate(timeout=60)
    assert_same_outputs(workdir, reference)


def test_snakemake_terminated_lets_running_jobs_finish(workdir, reference):
    """SIGTERM (kill, scancel of the driver job): Snakemake lets the running collect
    jobs finish, starts nothing new, releases its lock; a plain rerun does the rest."""
    forget(workdir, MERGED, *[s for s in SHARDS if "/beta/" in s])
    proc = start(workdir, "collect.checkpointed@1=stop")
    try:
        wait_for(stopped(workdir, "collect", 2), "two collect jobs at a checkpoint", proc)
        running = sorted(jobs(workdir, "collect"))
        proc.send_signal(signal.SIGTERM)
        time.sleep(1)
        for pid in running:
            os.kill(pid, signal.SIGCONT)
        out, _ = proc.communicate(timeout=TIMEOUT)
    except BaseException:
        kill_group(proc)
        raise
    assert proc.returncode != 0, out
    beta = [s for s in SHARDS if "/beta/" in s]
    assert sum((workdir / s).exists() for s in beta) == 2  # the two running ones finished
    assert not (workdir / MERGED).exists()
    assert not (workdir / ".snakemake" / "locks").exists() or not any(
        (workdir / ".snakemake" / "locks").iterdir()
    )
    snakemake(workdir, MERGED)  # no --unlock needed
    assert_same_outputs(workdir, reference)
