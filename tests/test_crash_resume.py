"""`imatrix collect` killed with SIGKILL at every moment that matters, then rerun.

The process is killed for real (SIGKILL: no handler, no flush, no cleanup), at points
named by the library's crash hook (``IMATRIX_FAULT``, :mod:`imatrix.faults`): between
chunks, in the middle of a checkpoint write, between a checkpoint's temporary file and
its rename, while the final output is half written, after the output's rename but
before the checkpoint's removal. Each time the test checks what a reader would find
(the user's previous output, untouched, or the finished output; a checkpoint that is
either absent or complete and valid), then reruns the same command with ``--resume``
and requires the very bytes of an uninterrupted run with the same flags, and the same
final perplexity. Also: a kill from outside at a random moment, two kills in a row, a
resume with a different batch plan (counts identical, sums equal to float32
rounding), damaged checkpoints (ignored with a warning, never trusted), two collectors
on one output (the second waits for the first), temporary files of killed writers,
fuzzed checkpoints (rejected, or read exactly as written), and the crash hook itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from test_fuzz_readers import FUZZ, _mutations

from imatrix import faults
from imatrix.collect import KEY_CHECKPOINT_STATE, load_checkpoint
from imatrix.errors import ImatrixError
from imatrix.formats import read_imatrix, write_imatrix
from imatrix.gguf_io import read_gguf

pytestmark = pytest.mark.timeout(600)

#: 12 chunks of 128 tokens, two sequences per batch (chunk plan: 6 batches), a
#: checkpoint whenever a batch crosses a multiple of 3 chunks: after 4, 6 and 10
#: chunks; the output is written once, after 12
FLAGS = ["-c", "128", "-b", "256", "--chunks", "12", "-ofreq", "3", "-t", "1", "--no-progress"]
PREVIOUS = b"the user's previous result, which no failed run may damage"

#: (id, IMATRIX_FAULT, checkpoint chunk expected after the kill, output after the kill)
CASES = [
    ("between-chunks-before-any-checkpoint", "collect.chunk@1", None, "previous"),
    ("between-chunks-after-a-checkpoint", "collect.chunk@3", 4, "previous"),
    ("between-chunks-after-the-last-batch", "collect.chunk@6", 10, "previous"),
    ("right-after-a-checkpoint", "collect.checkpointed@1", 4, "previous"),
    ("first-checkpoint-half-written", "write.partial:*.checkpoint@1", None, "previous"),
    ("second-checkpoint-not-yet-renamed", "write.complete:*.checkpoint@2", 4, "previous"),
    ("third-checkpoint-renamed-dir-not-synced", "write.renamed:*.checkpoint@3", 10, "previous"),
    ("output-half-written", "write.partial:out.gguf@1", 10, "previous"),
    ("output-complete-not-yet-renamed", "write.complete:out.gguf@1", 10, "previous"),
    ("output-renamed-dir-not-synced", "write.renamed:out.gguf@1", 10, "final"),
    ("output-done-checkpoint-not-removed", "collect.done", 10, "final"),
]
MOE_CASES = {
    "between-chunks-after-a-checkpoint",
    "first-checkpoint-half-written",
    "output-half-written",
    "output-done-checkpoint-not-removed",
}


def collect_cmd(model: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "imatrix",
        "collect",
        "-m",
        str(model),
        "-f",
        str(text),
        "-o",
        str(out),
        *FLAGS,
        *extra,
    ]


def run(cmd: list[str], fault: str | None = None, **kw) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    if fault:
        env[faults.ENV] = fault
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, **kw)


def final_ppl(stdout: str) -> str | None:
    lines = [x for x in stdout.splitlines() if x.startswith("Final estimate")]
    return lines[-1] if lines else None


def leftovers(d: Path, *keep: str) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name not in keep)


def checkpoint_chunk(out: Path) -> int | None:
    ck = Path(f"{out}.checkpoint")
    if not ck.exists():
        return None
    return read_imatrix(ck).provenance.chunk_reached


@pytest.fixture(scope="module")
def references(tmp_path_factory, dense_model, moe_model, calib_text):
    """Uninterrupted runs with the same flags, per (model, format): bytes and stdout.
    Perplexity on the dense model (its state is in the checkpoint too); the MoE model
    runs without it, which lets the collector cut graphs early."""
    d = tmp_path_factory.mktemp("reference")
    refs = {}
    for kind, model, extra in (("dense", dense_model, []), ("moe", moe_model, ["--no-ppl"])):
        for fmt in ("gguf", "dat"):
            out = d / f"{kind}.{fmt}"
            proc = run(collect_cmd(model, calib_text, out, "--output-format", fmt, *extra))
            assert proc.returncode == 0, proc.stderr
            refs[kind, fmt] = (out.read_bytes(), proc.stdout, extra)
    return refs


def kill_then_resume(
    tmp_path: Path,
    model: Path,
    text: Path,
    ref: tuple[bytes, str, list[str]],
    fault: str,
    expect_ckpt: int | None,
    expect_out: str,
    fmt: str = "gguf",
) -> None:
    ref_bytes, ref_stdout, extra = ref
    d = tmp_path / "run"
    d.mkdir()
    out = d / f"out.{fmt}"
    out.write_bytes(PREVIOUS)
    cmd = collect_cmd(model, text, out, "--output-format", fmt, *extra)

    killed = run(cmd, fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # what a reader finds now: the previous output or the finished one, never a mix
    after = out.read_bytes()
    assert after == (PREVIOUS if expect_out == "previous" else ref_bytes)
    assert checkpoint_chunk(out) == expect_ckpt

    resumed = run([*cmd, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_bytes() == ref_bytes
    if expect_ckpt is not None:
        assert f"resuming from {out}.checkpoint at chunk {expect_ckpt}" in resumed.stderr
    else:
        assert "resuming from" not in resumed.stderr
    assert final_ppl(resumed.stdout) == final_ppl(ref_stdout)
    # nothing left behind: no checkpoint, no temporary file of the killed writer, no lock
    assert leftovers(d) == [out.name]


@pytest.mark.parametrize(("case", "fault", "ckpt", "out"), CASES, ids=[c[0] for c in CASES])
def test_killed_dense_run_resumes_to_the_same_bytes(
    case, fault, ckpt, out, tmp_path, dense_model, calib_text, references
):
    kill_then_resume(
        tmp_path, dense_model, calib_text, references["dense", "gguf"], fault, ckpt, out
    )


@pytest.mark.parametrize(
    ("case", "fault", "ckpt", "out"),
    [c for c in CASES if c[0] in MOE_CASES],
    ids=[c[0] for c in CASES if c[0] in MOE_CASES],
)
def test_killed_moe_run_resumes_to_the_same_bytes(
    case, fault, ckpt, out, tmp_path, moe_model, calib_text, references
):
    kill_then_resume(tmp_path, moe_model, calib_text, references["moe", "gguf"], fault, ckpt, out)


@pytest.mark.parametrize("fault", ["write.partial:out.dat", "write.complete:*.checkpoint@3"])
def test_killed_dat_run_resumes_to_the_same_bytes(
    fault, tmp_path, dense_model, calib_text, references
):
    """Legacy .dat output: the checkpoint is GGUF all the same; the .dat bytes match."""
    ckpt = 10 if fault.startswith("write.partial") else 6
    kill_then_resume(
        tmp_path,
        dense_model,
        calib_text,
        references["dense", "dat"],
        fault,
        ckpt,
        "previous",
        fmt="dat",
    )


def test_killed_twice(tmp_path, dense_model, calib_text, references):
    """A resumed run killed again resumes again, from its own later checkpoint."""
    ref_bytes, ref_stdout, _ = references["dense", "gguf"]
    out = tmp_path / "out.gguf"
    cmd = collect_cmd(dense_model, calib_text, out)
    assert run(cmd, "collect.checkpointed@1").returncode == -signal.SIGKILL
    assert checkpoint_chunk(out) == 4
    second = run([*cmd, "--resume"], "write.partial:*.checkpoint@2")
    assert second.returncode == -signal.SIGKILL
    assert checkpoint_chunk(out) == 6
    third = run([*cmd, "--resume"])
    assert third.returncode == 0, third.stderr
    assert "at chunk 6" in third.stderr
    assert out.read_bytes() == ref_bytes
    assert final_ppl(third.stdout) == final_ppl(ref_stdout)


def signal_when(cmd: list[str], trigger: Path, sig: int) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (no crash hook) and send it ``sig`` from outside as soon as
    ``trigger`` exists; the process may have finished before (then it exits 0)."""
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not trigger.exists() and proc.poll() is None:
            assert time.monotonic() < deadline, f"{trigger} never appeared"
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def interrupted_run(
    tmp_path: Path, model: Path, text: Path, sig: int
) -> tuple[Path, list[str], subprocess.CompletedProcess[str]]:
    """A collection sent ``sig`` from outside once its first checkpoint exists: output,
    command and the run. A run that finishes first has tested nothing: it is retried with
    an earlier moment (as soon as the output's lock exists, i.e. during start-up), and
    the test fails if no attempt was interrupted."""
    for trigger in (".checkpoint", ".lock"):
        d = tmp_path / trigger.strip(".")
        d.mkdir()
        out = d / "out.gguf"
        cmd = collect_cmd(model, text, out)
        proc = signal_when(cmd, Path(f"{out}{trigger}"), sig)
        if proc.returncode != 0:
            return out, cmd, proc
    pytest.fail(f"every run finished before signal {sig}: nothing was tested")


def test_killed_from_outside_at_a_random_moment(tmp_path, dense_model, calib_text, references):
    """No hook: SIGKILL from another process once the first checkpoint exists. A run
    that finishes before the kill lands has tested nothing: it is retried with an
    earlier kill point (as soon as the output's lock exists, i.e. during start-up),
    and the test fails if no attempt was killed."""
    ref_bytes, _, _ = references["dense", "gguf"]
    out, cmd, killed = interrupted_run(tmp_path, dense_model, calib_text, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run([*cmd, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_bytes() == ref_bytes
    assert leftovers(out.parent) == ["out.gguf"]


def test_resume_with_another_batch_plan_keeps_counts(tmp_path, dense_model, calib_text, references):
    """-b is not part of what a checkpoint must match: resuming with 4 sequences per
    batch instead of 2 changes the order of float additions, not the counts."""
    ref = read_imatrix_bytes(references["dense", "gguf"][0], tmp_path)
    out = tmp_path / "out.gguf"
    cmd = collect_cmd(dense_model, calib_text, out)
    assert run(cmd, "collect.checkpointed@1").returncode == -signal.SIGKILL
    resumed = run([*cmd, "-b", "512", "--resume"])  # the later -b wins
    assert resumed.returncode == 0, resumed.stderr
    assert "at chunk 4" in resumed.stderr
    got = read_imatrix(out)
    assert sorted(got.entries) == sorted(ref.entries)
    assert (got.chunk_count, got.chunk_size, got.datasets) == (
        ref.chunk_count,
        ref.chunk_size,
        ref.datasets,
    )
    for name, e in ref.entries.items():
        np.testing.assert_array_equal(got.entries[name].counts, e.counts, err_msg=name)
        np.testing.assert_allclose(got.entries[name].values, e.values, rtol=1e-6, err_msg=name)


def read_imatrix_bytes(blob: bytes, d: Path):
    p = d / "reference.gguf"
    p.write_bytes(blob)
    return read_imatrix(p)


# --- damaged checkpoints: ignored with a warning, never trusted -------------------


@pytest.fixture(scope="module")
def sound_checkpoint(tmp_path_factory, dense_model, calib_text) -> bytes:
    """A checkpoint after 6 chunks, from a killed run."""
    d = tmp_path_factory.mktemp("ckpt")
    out = d / "out.gguf"
    proc = run(collect_cmd(dense_model, calib_text, out), "collect.checkpointed@2")
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint_chunk(out) == 6
    return Path(f"{out}.checkpoint").read_bytes()


def _flip_last_data_byte(blob: bytes) -> bytes:
    b = bytearray(blob)
    b[-5] ^= 0x40  # inside the last tensor's float32 data: still a well-formed GGUF
    return bytes(b)


def _garble_state(blob: bytes) -> bytes:
    i = blob.index(b'{"signature"')
    return blob[:i] + b"#" + blob[i + 1 :]


DAMAGE = {
    "truncated": (lambda b: b[: len(b) // 2], "ignoring unusable checkpoint"),
    "cut-by-one-byte": (lambda b: b[:-1], "ignoring unusable checkpoint"),
    "flipped-bit-in-data": (_flip_last_data_byte, "checksum mismatch"),
    "garbled-state": (_garble_state, "corrupt checkpoint state"),
    "empty": (lambda b: b"", "file is empty"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_ignored_with_a_warning(
    damage, tmp_path, dense_model, calib_text, sound_checkpoint, references
):
    change, message = DAMAGE[damage]
    ref_bytes, ref_stdout, _ = references["dense", "gguf"]
    out = tmp_path / "out.gguf"
    ck = Path(f"{out}.checkpoint")
    ck.write_bytes(change(sound_checkpoint))
    proc = run([*collect_cmd(dense_model, calib_text, out), "--resume"])
    assert proc.returncode == 0, proc.stderr
    warnings = [x for x in proc.stderr.splitlines() if x.startswith("W imatrix.collect")]
    assert len(warnings) == 1 and message in warnings[0] and str(ck) in warnings[0], proc.stderr
    assert "starting from chunk 0" in warnings[0]
    assert "resuming from" not in proc.stderr
    assert out.read_bytes() == ref_bytes
    assert final_ppl(proc.stdout) == final_ppl(ref_stdout)
    assert not ck.exists()


def test_an_imatrix_in_place_of_the_checkpoint_is_not_trusted(
    tmp_path, dense_model, calib_text, references
):
    """A finished imatrix (no checkpoint state) under the checkpoint's name."""
    out = tmp_path / "out.gguf"
    Path(f"{out}.checkpoint").write_bytes(references["moe", "gguf"][0])
    proc = run([*collect_cmd(dense_model, calib_text, out), "--resume"])
    assert proc.returncode == 0, proc.stderr
    assert "not a collector checkpoint" in proc.stderr
    assert out.read_bytes() == references["dense", "gguf"][0]


def test_sound_checkpoint_of_other_settings_is_refused(
    tmp_path, dense_model, calib_text, sound_checkpoint
):
    """Not damaged but made for another chunk range: resuming would mix two different
    computations, so --resume refuses (one line, exit 1) and leaves the file alone."""
    out = tmp_path / "out.gguf"
    ck = Path(f"{out}.checkpoint")
    ck.write_bytes(sound_checkpoint)
    cmd = [*collect_cmd(dense_model, calib_text, out), "--chunks", "11", "--resume"]
    proc = run(cmd)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("imatrix collect: error: ")
    assert "different settings (last_chunk)" in proc.stderr and "Traceback" not in proc.stderr
    assert ck.read_bytes() == sound_checkpoint and not out.exists()


@pytest.fixture(scope="module")
def other_inputs(tmp_path_factory, calib_text, references):
    """Another text (one word changed) and two imatrices with the same datasets but
    different sums (for --in-file)."""
    d = tmp_path_factory.mktemp("other")
    text = d / "other.txt"
    words = calib_text.read_text(encoding="utf-8").split(" ")
    text.write_text(" ".join(["changed", *words[1:]]), encoding="utf-8")
    a, b = d / "a.gguf", d / "b.gguf"
    a.write_bytes(references["dense", "gguf"][0])
    data = read_imatrix(a)
    for e in data.entries.values():
        e.values = e.values * 2
    write_imatrix(data, b)
    assert read_imatrix(b).datasets == read_imatrix(a).datasets
    return {"text": text, "a": a, "b": b}


#: (setting the README lists, how the rerun differs, the signature keys it changes)
OTHER_SETTINGS = {
    "model": (lambda k: ["-m", str(k["moe"])], "model_sha256"),
    "text": (lambda k: ["-f", str(k["text"])], "tokens_sha256"),
    "ctx-size": (lambda k: ["-c", "64"], "n_ctx"),
    "chunk-range-last": (lambda k: ["--chunks", "11"], "last_chunk"),
    "chunk-range-first": (lambda k: ["--chunk", "1"], "first_chunk"),
    "process-output": (lambda k: ["--process-output"], "process_output"),
    "in-file-added": (lambda k: ["--in-file", str(k["a"])], "base_datasets"),
    "in-file-other-same-datasets": (lambda k: ["--in-file", str(k["b"])], "base_sha256"),
}


@pytest.mark.parametrize("setting", list(OTHER_SETTINGS))
def test_checkpoint_of_each_other_setting_is_refused(
    setting, tmp_path, dense_model, moe_model, calib_text, other_inputs
):
    """For each setting the README lists (model, text, -c, chunk range,
    --process-output, --in-file), a sound checkpoint made without that change is
    refused by --resume: exit 1, one line naming the setting, the checkpoint kept. The
    last case resumes with another --in-file of the same datasets (only its sums
    differ) than the checkpoint was made with."""
    change, key = OTHER_SETTINGS[setting]
    out = tmp_path / "out.gguf"
    base = ["--in-file", str(other_inputs["a"])] if setting.startswith("in-file-other") else []
    made = run(collect_cmd(dense_model, calib_text, out, *base), "collect.checkpointed@1")
    assert made.returncode == -signal.SIGKILL, made.stderr
    ck = Path(f"{out}.checkpoint")
    sound = ck.read_bytes()
    extra = change({**other_inputs, "moe": moe_model})
    proc = run([*collect_cmd(dense_model, calib_text, out), *extra, "--resume"])
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("imatrix collect: error: ") and "Traceback" not in proc.stderr
    listed = last.split("different settings (", 1)[1].split(")", 1)[0].split(", ")
    assert key in listed, last
    assert ck.read_bytes() == sound and not out.exists()


# --- SIGTERM: finish the chunks in flight, checkpoint, exit 143 -----------------------

#: (id, crash hook that freezes the collector, checkpoint chunk expected after SIGTERM)
SIGTERM_CASES = [
    # after the first group (chunks 0-1): off the -ofreq cadence, an exact checkpoint
    ("off-cadence", "collect.chunk@1=stop", 2),
    # after the group that crosses 3 chunks: the periodic checkpoint at 4 is the one
    ("on-cadence", "collect.chunk@2=stop", 4),
    # right after a checkpoint was written (same group): nothing more to write
    ("after-a-checkpoint", "collect.checkpointed@2=stop", 6),
]


def sigterm_at(cmd: list[str], fault: str) -> subprocess.CompletedProcess[str]:
    """Freeze the collector at ``fault``, send SIGTERM, let it continue."""
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    proc = subprocess.Popen(
        cmd,
        env={**env, faults.ENV: fault},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: _state(proc.pid) == "T", f"the collector to stop at {fault}")
        os.kill(proc.pid, signal.SIGTERM)
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize(
    ("case", "fault", "ckpt"), SIGTERM_CASES, ids=[c[0] for c in SIGTERM_CASES]
)
def test_sigterm_checkpoints_and_resumes_to_the_same_bytes(
    kind, case, fault, ckpt, tmp_path, dense_model, moe_model, calib_text, references
):
    """SIGTERM (SLURM's warning before a preemption's or time limit's SIGKILL) while a
    group is decoded: the collector finishes the group, writes its checkpoint, exits
    143; the previous output is untouched; --resume continues from that chunk and ends
    byte-identical to an uninterrupted run, with the same perplexity."""
    ref_bytes, ref_stdout, extra = references[kind, "gguf"]
    model = dense_model if kind == "dense" else moe_model
    out = tmp_path / "out.gguf"
    out.write_bytes(PREVIOUS)
    cmd = collect_cmd(model, calib_text, out, "--output-format", "gguf", *extra)
    stopped = sigterm_at(cmd, fault)
    assert stopped.returncode == 143, stopped.stderr
    assert f"terminated by SIGTERM after chunk {ckpt}" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert checkpoint_chunk(out) == ckpt
    assert out.read_bytes() == PREVIOUS
    assert not Path(f"{out}.lock").exists()
    resumed = run([*cmd, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {out}.checkpoint at chunk {ckpt}" in resumed.stderr
    assert out.read_bytes() == ref_bytes
    assert final_ppl(resumed.stdout) == final_ppl(ref_stdout)
    assert leftovers(tmp_path) == [out.name]


@pytest.mark.parametrize("fault", ["collect.chunk@6=stop", "write.partial:out.gguf=stop"])
def test_sigterm_in_the_last_group_finishes_the_run(
    fault, tmp_path, dense_model, calib_text, references
):
    """In the last group or while the output is written, nothing is left to save for
    later: the output is completed and the exit status is 0."""
    ref_bytes, ref_stdout, _ = references["dense", "gguf"]
    out = tmp_path / "out.gguf"
    cmd = collect_cmd(dense_model, calib_text, out)
    done = sigterm_at(cmd, fault)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == ref_bytes
    assert final_ppl(done.stdout) == final_ppl(ref_stdout)
    assert leftovers(tmp_path) == [out.name]


def test_sigterm_from_outside_mid_decode(tmp_path, dense_model, calib_text, references):
    """No hook: SIGTERM from another process when the first checkpoint appears, i.e.
    while later chunks are being decoded; retried earlier (at start-up) if the run
    finished first, failed if no attempt was terminated."""
    ref_bytes, _, _ = references["dense", "gguf"]
    out, cmd, stopped = interrupted_run(tmp_path, dense_model, calib_text, signal.SIGTERM)
    assert stopped.returncode == 143, stopped.stderr
    reached = checkpoint_chunk(out)
    assert reached is not None and 2 <= reached < 12
    resumed = run([*cmd, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"at chunk {reached}" in resumed.stderr
    assert out.read_bytes() == ref_bytes


# --- one writer per output --------------------------------------------------------


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def _wait_for(cond, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_second_collector_waits_for_the_first(tmp_path, dense_model, calib_text, references):
    """The situation after Snakemake died and was rerun while its job lives on: a
    second collector for the same output waits for the first (here frozen right after
    its first checkpoint, lock held), and only then runs; the result is the same."""
    ref_bytes, _, _ = references["dense", "gguf"]
    out = tmp_path / "out.gguf"
    err_file = tmp_path.parent / f"{tmp_path.name}-second.err"  # not a leftover of the run
    cmd = collect_cmd(dense_model, calib_text, out)
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    first = subprocess.Popen(
        cmd,
        env={**env, faults.ENV: "collect.checkpointed@1=stop"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    second = None
    try:
        _wait_for(lambda: _state(first.pid) == "T", "the first collector to stop")
        assert checkpoint_chunk(out) == 4
        with err_file.open("w") as err_out:
            second = subprocess.Popen(
                [*cmd, "--resume"], env=env, stdout=subprocess.DEVNULL, stderr=err_out
            )
        # its line comes before it blocks on the lock: no guess of how long it needs
        _wait_for(lambda: "waiting for it to finish" in err_file.read_text(), "the wait")
        assert second.poll() is None
        assert checkpoint_chunk(out) == 4 and not out.exists()
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=120) == 0
        assert second.wait(timeout=120) == 0, err_file.read_text()
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(timeout=60)
    err = err_file.read_text()
    assert f"{out} is being written by pid {first.pid} on " in err
    assert "lock on" in err and "obtained after" in err
    assert out.read_bytes() == ref_bytes
    assert leftovers(tmp_path) == ["out.gguf"]


def test_lock_of_a_killed_collector_does_not_block(tmp_path, dense_model, calib_text, references):
    """The kernel drops a dead process's lock: the lock file left by a SIGKILLed run
    does not make the rerun wait."""
    out = tmp_path / "out.gguf"
    cmd = collect_cmd(dense_model, calib_text, out)
    assert run(cmd, "collect.chunk@2").returncode == -signal.SIGKILL
    assert Path(f"{out}.lock").exists()
    proc = run([*cmd, "--resume"])
    assert proc.returncode == 0 and "waiting" not in proc.stderr
    assert out.read_bytes() == references["dense", "gguf"][0]


# --- the crash hook itself --------------------------------------------------------

_PROBE = (
    "import sys\n"
    "from imatrix import faults\n"
    "for i in range(5):\n"
    "    print(i, flush=True)\n"
    "    faults.point('write.partial', 'a.checkpoint')\n"
    "    faults.point('write.partial', 'b.gguf')\n"
    "    faults.point('collect.chunk')\n"
    "print('end', flush=True)\n"
)


@pytest.mark.parametrize(
    ("spec", "stdout", "rc"),
    [
        (None, "0 1 2 3 4 end", 0),
        ("collect.chunk", "0", -signal.SIGKILL),
        ("collect.chunk@3", "0 1 2", -signal.SIGKILL),
        ("write.partial:*.gguf@2", "0 1", -signal.SIGKILL),
        ("write.partial:*.checkpoint@4=kill", "0 1 2 3", -signal.SIGKILL),
        ("write.partial:*.dat", "0 1 2 3 4 end", 0),  # matches no file
        ("collect.done", "0 1 2 3 4 end", 0),  # a point this program never passes
    ],
)
def test_fault_hook_kills_at_the_nth_pass(spec, stdout, rc):
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    if spec:
        env[faults.ENV] = spec
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == rc, proc.stderr
    assert proc.stdout.split() == stdout.split()


def test_fault_hook_stop_freezes_until_continued():
    env = {**os.environ, faults.ENV: "collect.chunk@2=stop"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _PROBE], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        _wait_for(lambda: _state(proc.pid) == "T", "the probe to stop")
        os.kill(proc.pid, signal.SIGCONT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and out.split() == "0 1 2 3 4 end".split()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("collect.chunks", "unknown point 'collect.chunks'"),
        ("collect.chunk@0", "expected <point>"),
        ("collect.chunk=explode", "expected <point>"),
        ("", "expected <point>"),
    ],
)
def test_fault_hook_refuses_bad_specs(spec, message):
    with pytest.raises(ImatrixError, match=message):
        faults.parse(spec)
    assert faults.parse("write.complete:*.gguf@2=stop") == faults.FaultSpec(
        "write.complete", "*.gguf", 2, "stop"
    )


# --- temporary files of killed writers ----------------------------------------------


def test_next_write_removes_a_killed_writers_temporary_file(tmp_path, references):
    """Any atomic write (here `imatrix convert`) removes the temporary files of the
    same output left by killed writers on this host, and only those: a live writer's
    (this test process) and another host's are kept."""
    src = tmp_path / "in.gguf"
    src.write_bytes(references["moe", "gguf"][0])
    out = tmp_path / "out.gguf"
    out.write_bytes(PREVIOUS)
    cmd = [sys.executable, "-m", "imatrix", "convert", str(src), "-o", str(out)]
    assert run(cmd, "write.partial:out.gguf").returncode == -signal.SIGKILL
    (dead,) = tmp_path.glob(".out.gguf.*.tmp")
    assert out.read_bytes() == PREVIOUS and dead.stat().st_size > 0
    live = tmp_path / f".out.gguf.{os.getpid()}@{os.uname().nodename}.abcdefgh.tmp"
    remote = tmp_path / ".out.gguf.12345@another-node.abcdefgh.tmp"
    live.write_bytes(b"being written")
    remote.write_bytes(b"being written elsewhere")
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == src.read_bytes()
    assert leftovers(tmp_path) == sorted([live.name, remote.name, "in.gguf", "out.gguf"])


# --- fuzzed checkpoints: rejected, or read exactly as written -----------------------


def test_mutated_checkpoints_are_rejected_or_read_exactly(sound_checkpoint, tmp_path_factory):
    """Whatever happens to a checkpoint's bytes (truncation, flipped bytes, extreme
    values, appended garbage), resuming either refuses it with our error (a damaged one
    is then ignored) or gets exactly the data, chunk and state that were written: a
    mutation that survives can only have hit bytes nothing reads (padding). A few
    hundred cases by default; IMATRIX_FUZZ_EXAMPLES for a longer run."""
    d = tmp_path_factory.mktemp("fuzz-ckpt")
    good = d / "good.checkpoint"
    good.write_bytes(sound_checkpoint)
    sig = json.loads(read_gguf(good, load_data=False).get(KEY_CHECKPOINT_STATE))["signature"]
    ref_data, ref_reached, ref_state = load_checkpoint(good, sig)
    n_accepted = [0, 0]

    @FUZZ
    @given(blob=_mutations(sound_checkpoint))
    def check(blob: bytes) -> None:
        p = d / "x.checkpoint"
        p.write_bytes(blob)
        n_accepted[1] += 1
        try:
            data, reached, state = load_checkpoint(p, sig)
        except ImatrixError:
            return
        n_accepted[0] += 1
        assert (reached, state) == (ref_reached, ref_state)
        assert sorted(data.entries) == sorted(ref_data.entries)
        for name, e in ref_data.entries.items():
            g = data.entries[name]
            np.testing.assert_array_equal(g.values, e.values)
            np.testing.assert_array_equal(g.counts, e.counts)
            np.testing.assert_array_equal(g.sums, e.sums)

    check()
    assert n_accepted[0] < n_accepted[1]  # the mutations did reach the checks
