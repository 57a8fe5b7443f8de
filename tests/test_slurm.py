"""The workflow through ``snakemake --profile profiles/slurm`` on a real SLURM cluster.

The cluster is real (tests/slurm/start-cluster.sh: slurmctld, slurmd and munged on this
machine, one node with fake GPUs, which Slurm schedules like real ones); nothing is
mocked. The tiny-model workflow config (tests/workflow_config, working directory built
as tests/test_workflow.py builds it) runs twice: locally with ``-c2``, then through a
copy of profiles/slurm that differs only in the partition (and, on a cluster without
accounting, ``slurm-status-command: squeue``, the setting the profile documents for
such sites). What is proven, from the scheduler's own records (``scontrol show job``:
batch flag, comment naming the rule and wildcards, GPU request, final state) and
slurmctld's log of batch submissions:
- every job Snakemake did not run locally went through ``sbatch`` and completed, once;
- collect jobs (``collect.ngl: 1``) asked Slurm for a GPU and got
  ``CUDA_VISIBLE_DEVICES`` inside the job; no other job asked for one (evaluate runs
  with ``ngl: 0``);
- a collect job that fails once (a fault injected through the environment, see
  ``FAULT_HOOK``) is resubmitted by the profile's ``retries`` and then succeeds;
- every output equals the local run's byte for byte (Snakemake's timing files aside).

Two tests prove that a collect job resumes on SLURM from the checkpoint its failed
attempt left (``ONCE_HOOK``: only the first collect process of a run is hurt): one
SIGKILLed just after its first checkpoint (``IMATRIX_FAULT``), one stopped by Slurm's
``--signal`` ahead of its time limit. The retry's log names the chunk it resumed from
and the chunks it decoded, and the shard equals the local run's byte for byte.

Another test runs the README's command for a config of one's own from a copy of the
checkout (which has the demo's config/config.yaml): the job processes see the user's
config alone, and with ``ngl: 0`` no job asks for a GPU.

Skipped, with the reason, when no SLURM cluster answers ``sinfo`` (a failure under
``CI=true``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

# the workflow tests' working directory: tiny model, datasets, config (tests/ is on
# sys.path: conftest.py puts it there)
from ci import skip_or_fail
from test_workflow import load_config, make_workdir
from test_workflow_user import USER_CONFIG, make_checkout, small_config
from tinymodels import sample_text

from imatrix.formats import read_imatrix

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "workflow" / "Snakefile"
PROFILE = ROOT / "profiles" / "slurm" / "config.yaml"
#: seconds before a hung run is killed (snakemake may ignore SIGTERM, hence timeout -k)
RUN_TIMEOUT = 1200
FAULT_RULE = "collect"

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(2 * RUN_TIMEOUT + 300)]

#: Test-only fault injection, put on PYTHONPATH of the SLURM run as sitecustomize.py:
#: the first Python process started for a Snakemake script of rule $IMATRIX_TEST_FAIL_RULE
#: (Snakemake runs `.snakemake/scripts/tmp<random>.<script name>` in a new interpreter)
#: claims the token file $IMATRIX_TEST_FAIL_ONCE by renaming it, atomically, so exactly
#: one job on any node fails, with exit status 3; every later attempt finds no token.
FAULT_HOOK = """\
import os
import sys

_token = os.environ.get("IMATRIX_TEST_FAIL_ONCE")
_rule = os.environ.get("IMATRIX_TEST_FAIL_RULE")
if _token and _rule and sys.argv and sys.argv[0].endswith("." + _rule + ".py"):
    try:
        os.rename(_token, _token + ".claimed")
    except FileNotFoundError:
        pass
    else:
        sys.stderr.write("imatrix test: fault injected into rule " + _rule + "\\n")
        sys.stderr.flush()
        os._exit(3)
"""

#: Test-only hook for the resume tests, put on PYTHONPATH as sitecustomize.py: the first
#: collect script process (see FAULT_HOOK) claims the token $IMATRIX_TEST_ONCE and only
#: it gets IMATRIX_FAULT=$IMATRIX_TEST_ONCE_FAULT and/or sleeps
#: $IMATRIX_TEST_ONCE_DELAY seconds after each group of chunks (the library's
#: `collect.chunk` point), so that a tiny model's job lasts until its time limit. The
#: retry finds no token and runs as a user's job does.
ONCE_HOOK = """\
import os
import sys

_token = os.environ.get("IMATRIX_TEST_ONCE")
if _token and sys.argv and sys.argv[0].endswith(".collect.py"):
    try:
        os.rename(_token, _token + ".claimed")
    except FileNotFoundError:
        pass
    else:
        if os.environ.get("IMATRIX_TEST_ONCE_FAULT"):
            os.environ["IMATRIX_FAULT"] = os.environ["IMATRIX_TEST_ONCE_FAULT"]
        _delay = float(os.environ.get("IMATRIX_TEST_ONCE_DELAY", "0"))
        if _delay > 0:
            import time

            from imatrix import faults

            _point = faults.point

            def _slow_point(name, path=None):
                if name == "collect.chunk":
                    time.sleep(_delay)
                _point(name, path)

            faults.point = _slow_point
"""
#: the one shard the resume tests collect (shards: 1)
SHARD = "results/tiny/shards/alpha/0.gguf"
SHARD_LOG = "logs/tiny/collect/alpha/0.log"
_RESUMED = re.compile(r"resuming from \S+ at chunk (\d+)")
_COMPUTING = re.compile(r"computing over (\d+) chunks \((\d+) to (\d+)\)")


# --- the cluster ------------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    partition: str
    has_accounting: bool
    slurmctld_log: Path | None


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    """The partition to test in: $IMATRIX_SLURM_PARTITION, else the default partition,
    which must have an idle or mixed node with `gpu` GRES."""
    if shutil.which("sinfo") is None:
        skip_or_fail("no SLURM here: sinfo not found (tests/slurm/start-cluster.sh starts one)")
    try:
        proc = _run(["sinfo", "--noheader", "--format=%P|%t|%G"])
    except subprocess.TimeoutExpired:
        skip_or_fail("no SLURM cluster answers: sinfo timed out")
    if proc.returncode != 0:
        reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"
        skip_or_fail(
            f"no SLURM cluster answers (sinfo: {reason}); start one with "
            "tests/slurm/start-cluster.sh"
        )
    rows = [ln.split("|") for ln in proc.stdout.splitlines() if ln.count("|") == 2]
    wanted = os.environ.get("IMATRIX_SLURM_PARTITION")
    if wanted is None:
        defaults = [p.rstrip("*") for p, _, _ in rows if p.endswith("*")]
        if not defaults:
            skip_or_fail("SLURM has no default partition; set IMATRIX_SLURM_PARTITION")
        wanted = defaults[0]
    usable = [
        r for r in rows if r[0].rstrip("*") == wanted and r[1] in ("idle", "mix") and "gpu" in r[2]
    ]
    if not usable:
        skip_or_fail(f"SLURM partition '{wanted}' has no idle node with gpu GRES: {rows}")
    # sacct fails without slurmdbd; the plugin's default status command is then useless
    has_accounting = _run(["sacct", "--noheader", "-X", "--starttime=now"]).returncode == 0
    conf = _run(["scontrol", "show", "config"]).stdout
    m = re.search(r"^SlurmctldLogFile\s*=\s*(\S+)", conf, re.M)
    log = Path(m.group(1)) if m else None
    return Cluster(wanted, has_accounting, log if log and os.access(log, os.R_OK) else None)


def gpus_asked(record: dict[str, str]) -> int:
    """GPUs a job asked Slurm for (``--gpus``/``--gres``), from its scheduler record."""
    tres = record.get("TresPerJob", "") + "," + record.get("TresPerNode", "")
    return sum(int(n) for n in re.findall(r"gpu(?::[\w-]+)?:(\d+)", tres))


def scheduler_records(workdir: Path) -> list[dict[str, str]]:
    """slurmctld's records of every job that ran in ``workdir`` (finished jobs stay for
    MinJobAge seconds; the test cluster keeps them an hour)."""
    out = _run(["scontrol", "--oneliner", "show", "job"]).stdout
    records = [dict(re.findall(r"(\S+?)=(\S*)", line)) for line in out.splitlines()]
    return [r for r in records if r.get("WorkDir") == str(workdir)]


# --- running Snakemake ------------------------------------------------------------------


def snakemake(workdir: Path, *args: str, env: dict[str, str]) -> str:
    """Run this checkout's workflow in ``workdir``; its log (stderr) on success."""
    cmd = ["timeout", "-k", "30", str(RUN_TIMEOUT), sys.executable, "-m", "snakemake"]
    cmd += ["-s", str(SNAKEFILE), "--configfile", "config.yaml", *args]
    proc = subprocess.run(
        cmd, cwd=workdir, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT + 60
    )
    (workdir / "snakemake.out").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} in {workdir} exited {proc.returncode} "
            f"(124: killed after {RUN_TIMEOUT} s):\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
        )
    return proc.stdout + proc.stderr


_HEADER = re.compile(r"^(local)?(rule|checkpoint) (\w+):$")
_JOBID = re.compile(r"^\s+jobid: (\d+)$")
_WILDCARDS = re.compile(r"^\s+wildcards: (.*)$")


@dataclass(frozen=True)
class Job:
    rule: str
    wildcards: tuple[str, ...]  # values, in the rule's order
    local: bool

    @property
    def comment(self) -> str:
        """The comment snakemake-executor-plugin-slurm gives the job's sbatch call."""
        if not self.wildcards:
            return f"rule_{self.rule}"
        return f"rule_{self.rule}_wildcards_" + "_".join(self.wildcards).replace("/", "_")


def jobs_of(log: str) -> dict[int, Job]:
    """Every job a Snakemake log announces, by Snakemake job id (a retried job keeps its
    id and is listed once)."""
    jobs: dict[int, Job] = {}
    header: tuple[str, bool] | None = None
    jobid: int | None = None
    wildcards: tuple[str, ...] = ()

    def flush() -> None:
        if header is not None and jobid is not None:
            jobs.setdefault(jobid, Job(header[0], wildcards, header[1]))

    for line in log.splitlines():
        if m := _HEADER.match(line):
            flush()
            header, jobid, wildcards = (m.group(3), bool(m.group(1))), None, ()
        elif header is not None and (m := _JOBID.match(line)):
            jobid = int(m.group(1))
        elif header is not None and (m := _WILDCARDS.match(line)):
            wildcards = tuple(kv.split("=", 1)[1] for kv in m.group(1).split(", "))
        elif not line.startswith((" ", "\t")):  # a block is its header's indented lines
            flush()
            header = None
    flush()
    return jobs


def output_files(workdir: Path) -> dict[str, bytes]:
    """Every file under results/ except Snakemake's `benchmark:` timings."""
    results = workdir / "results"
    return {
        str(p.relative_to(workdir)): p.read_bytes()
        for p in sorted(results.rglob("*"))
        if p.is_file() and p.relative_to(results).parts[0] != "benchmarks"
    }


def profile_copy(dest: Path, cluster: Cluster) -> dict:
    """profiles/slurm with the partition set (and squeue on a cluster without sacct)."""
    profile = yaml.safe_load(PROFILE.read_text())
    profile.setdefault("default-resources", {})["slurm_partition"] = cluster.partition
    for rule_resources in profile.get("set-resources", {}).values():
        rule_resources.pop("slurm_partition", None)
    if not cluster.has_accounting:
        profile["slurm-status-command"] = "squeue"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return profile


def clean_env() -> dict[str, str]:
    """This environment without a user's Snakemake profile or a job's SLURM context."""
    return {
        k: v
        for k, v in os.environ.items()
        if k != "SNAKEMAKE_PROFILE" and not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))
    }


# --- the test ---------------------------------------------------------------------------


def test_workflow_through_slurm_profile(
    cluster: Cluster, tmp_path: Path, dense_model: Path
) -> None:
    env = clean_env()

    # collect offloads a layer, so its jobs ask for a GPU (harmless on a CPU build);
    # evaluate does not (ngl: 0), so its job must not
    config = load_config()
    config["collect"]["ngl"] = 1
    assert config["evaluate"].get("ngl", 0) == 0
    gpu_rules = {"collect"}

    # 1. the reference: the same config run locally
    local_dir = make_workdir(tmp_path / "local", dense_model, config)
    local_log = snakemake(local_dir, "-c2", env=env)
    local_jobs = jobs_of(local_log)
    assert any(j.rule == FAULT_RULE for j in local_jobs.values()), local_log[-3000:]

    # 2. the same config through a copy of the profile, one collect job failing once
    slurm_dir = make_workdir(tmp_path / "slurm", dense_model, config)
    profile = profile_copy(tmp_path / "profile", cluster)
    assert profile["executor"] == "slurm" and profile["retries"] >= 1
    hook = tmp_path / "fault-hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAULT_HOOK)
    token = tmp_path / "fail-once.token"
    token.touch()
    slurm_env = dict(
        env,
        PYTHONPATH=os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")])),
        IMATRIX_TEST_FAIL_ONCE=str(token),
        IMATRIX_TEST_FAIL_RULE=FAULT_RULE,
    )
    slurm_log = snakemake(slurm_dir, "--profile", str(tmp_path / "profile"), env=slurm_env)
    assert not token.exists() and token.with_name(token.name + ".claimed").exists(), (
        "the injected fault never fired"
    )

    # the same DAG ran in both
    slurm_jobs = jobs_of(slurm_log)
    key = Counter((j.rule, j.wildcards) for j in local_jobs.values())
    assert Counter((j.rule, j.wildcards) for j in slurm_jobs.values()) == key
    remote = [j for j in slurm_jobs.values() if not j.local]
    assert {j.rule for j in remote} >= {"collect", "merge", "quantize", "evaluate"}, remote

    # 3. the scheduler's records: every non-local job went through sbatch and completed,
    #    exactly once; the one extra record is the injected failure, resubmitted after
    records = scheduler_records(slurm_dir)
    assert records, "slurmctld has no job of this run (MinJobAge shorter than the run?)"
    assert all(r["BatchFlag"] == "1" for r in records), records
    if cluster.slurmctld_log is not None:
        submitted = set(
            re.findall(
                r"_slurm_rpc_submit_batch_job: JobId=(\d+)", cluster.slurmctld_log.read_text()
            )
        )
        assert {r["JobId"] for r in records} <= submitted
    completed = Counter(r["Comment"] for r in records if r["JobState"] == "COMPLETED")
    assert completed == Counter(j.comment for j in remote)
    failed = [r for r in records if r["JobState"] != "COMPLETED"]
    assert len(failed) == 1, failed
    (fault,) = failed
    assert fault["JobState"] == "FAILED" and fault["Comment"].startswith(f"rule_{FAULT_RULE}_")
    retry = next(
        r for r in records if r["Comment"] == fault["Comment"] and r["JobState"] == "COMPLETED"
    )
    assert int(retry["JobId"]) > int(fault["JobId"])
    assert "Trying to restart job" in slurm_log
    # the failed job's Slurm log is kept and shows the injected fault inside the job
    fault_logs = list((slurm_dir / ".snakemake" / "slurm_logs").rglob(f"{fault['JobId']}.log"))
    assert len(fault_logs) == 1 and "fault injected" in fault_logs[0].read_text()

    # 4. GPUs: exactly the jobs of rules whose ngl > 0 asked Slurm for one ...
    assert FAULT_RULE in gpu_rules
    for r in records:
        rule = next(j.rule for j in remote if j.comment == r["Comment"])
        assert gpus_asked(r) == (1 if rule in gpu_rules else 0), r
    # ... and inside the job Slurm's allocation reached the collector
    for j in remote:
        if j.rule == "collect":
            m, d, s = j.wildcards
            text = (slurm_dir / f"logs/{m}/collect/{d}/{s}.log").read_text()
            assert re.search(r"CUDA_VISIBLE_DEVICES=\d", text), text

    # 5. the results equal the local run's, byte for byte
    local_out, slurm_out = output_files(local_dir), output_files(slurm_dir)
    assert sorted(slurm_out) == sorted(local_out)
    differ = [p for p in local_out if local_out[p] != slurm_out[p]]
    assert not differ


def test_user_config_through_slurm_profile(
    cluster: Cluster, tmp_path: Path, dense_model: Path
) -> None:
    """The README's command for a config of one's own, from a checkout that has the
    demo's config/config.yaml: each job process re-reads the Snakefile and must see the
    user's config alone, not the demo's datasets merged back in. Run with
    --replace-workflow-config, the flag users had to give before: Snakemake does not pass
    it on to job processes, so it protects only the main process (which
    tests/test_workflow_user.py checks with and without it)."""
    checkout = make_checkout(tmp_path / "checkout", dense_model, small_config())
    # what a site does: edit the SITE lines of the checkout's own profile
    profile_copy(checkout / "profiles" / "slurm", cluster)
    cmd = ["timeout", "-k", "30", str(RUN_TIMEOUT), sys.executable, "-m", "snakemake"]
    cmd += ["--profile", "profiles/slurm", "--replace-workflow-config"]
    cmd += ["--configfile", USER_CONFIG]
    proc = subprocess.run(
        cmd,
        cwd=checkout,
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=RUN_TIMEOUT + 60,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-8000:]

    merged = read_imatrix(checkout / "results/tiny/imatrix.gguf")
    assert merged.datasets == ["alpha"]
    records = scheduler_records(checkout)
    remote = [j for j in jobs_of(log).values() if not j.local]
    assert {j.rule for j in remote} >= {"collect", "merge", "quantize"}, remote
    assert Counter(r["Comment"] for r in records) == Counter(j.comment for j in remote)
    assert all(r["JobState"] == "COMPLETED" for r in records), records
    # ngl: 0 everywhere: no job asks for a GPU, whatever the profile says about GPUs
    assert all(gpus_asked(r) == 0 for r in records), records


# --- resume on SLURM --------------------------------------------------------------------


def resume_config(chunks: int, n_ctx: int, output_frequency: int) -> dict:
    """The test config cut to one dataset in one shard of ``chunks`` chunks."""
    cfg = load_config()
    cfg["datasets"] = {"alpha": dict(cfg["datasets"]["alpha"], chunks=chunks)}
    cfg["collect"].update(
        shards=1, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, output_frequency=output_frequency
    )
    return cfg


def run_once_hurt(tmp_path: Path, workdir: Path, profile: Path, **hurt: str) -> str:
    """Collect SHARD in ``workdir`` through ``profile`` with ONCE_HOOK armed by ``hurt``
    (IMATRIX_TEST_ONCE_<KEY>=value); Snakemake's log. The token must be claimed."""
    hook = tmp_path / "once-hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(ONCE_HOOK)
    token = tmp_path / "once.token"
    token.touch()
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))
    env["IMATRIX_TEST_ONCE"] = str(token)
    env.update({f"IMATRIX_TEST_ONCE_{k.upper()}": v for k, v in hurt.items()})
    log = snakemake(workdir, "--profile", str(profile), SHARD, env=env)
    assert not token.exists(), "no collect job claimed the hook's token"
    return log


def retry_of(workdir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The failed collect job and its completed retry, from the scheduler's records."""
    records = scheduler_records(workdir)
    assert len(records) == 2, records
    failed, retry = sorted(records, key=lambda r: int(r["JobId"]))
    assert failed["Comment"] == retry["Comment"] and failed["Comment"].startswith("rule_collect_")
    assert failed["JobState"] == "FAILED" and retry["JobState"] == "COMPLETED", records
    return failed, retry


def _seconds(hms: str) -> int:
    """Seconds of a Slurm duration ``[D-]HH:MM:SS``."""
    days, _, rest = hms.rpartition("-")
    h, m, s = (int(x) for x in rest.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def assert_resumed(workdir: Path, local_dir: Path, reached: int, last: int) -> None:
    """The retry resumed at chunk ``reached`` and decoded only ``[reached, last)``; the
    checkpoint is gone and the shard equals the local run's."""
    log = (workdir / SHARD_LOG).read_text()
    assert [int(c) for c in _RESUMED.findall(log)] == [reached], log
    assert _COMPUTING.findall(log) == [(str(last - reached), str(reached), str(last))], log
    assert not list((workdir / "results").rglob("*.checkpoint"))
    assert (workdir / SHARD).read_bytes() == (local_dir / SHARD).read_bytes()


def test_collect_resumes_after_kill_through_slurm(
    cluster: Cluster, tmp_path: Path, dense_model: Path
) -> None:
    """Item: a collect job SIGKILLed just after its first checkpoint (chunk 2 of 6) is
    resubmitted by the profile's retries and decodes only chunks 2 to 6."""
    config = resume_config(chunks=6, n_ctx=128, output_frequency=2)
    local_dir = make_workdir(tmp_path / "local", dense_model, config)
    snakemake(local_dir, "-c1", SHARD, env=clean_env())
    assert _COMPUTING.findall((local_dir / SHARD_LOG).read_text()) == [("6", "0", "6")]

    workdir = make_workdir(tmp_path / "slurm", dense_model, config)
    profile_copy(tmp_path / "profile", cluster)
    log = run_once_hurt(tmp_path, workdir, tmp_path / "profile", fault="collect.checkpointed")
    assert "Trying to restart job" in log
    failed, _ = retry_of(workdir)
    assert failed["ExitCode"] != "0:0", failed
    assert_resumed(workdir, local_dir, reached=2, last=6)


#: the time-limit test: Slurm's limit for the collect job (minutes), the lead time of
#: its SIGTERM (seconds; slurmctld may send it up to 30 s earlier, its check interval),
#: seconds the first attempt sleeps per chunk, and chunks (more than the attempt can do
#: before the limit: 100 x 2 s > 120 s)
LIMIT_MINUTES, SIGNAL_LEAD, CHUNK_DELAY, LIMIT_CHUNKS = 2, 30, 2.0, 100


def test_collect_resumes_after_time_limit_through_slurm(
    cluster: Cluster, tmp_path: Path, dense_model: Path
) -> None:
    """Item: a collect job that reaches its time limit gets the profile's SIGTERM ahead
    of it, checkpoints (no periodic checkpoint is due: output_frequency exceeds the
    chunks) and exits; the retry resumes there, not at chunk 0."""
    config = resume_config(chunks=LIMIT_CHUNKS, n_ctx=64, output_frequency=10 * LIMIT_CHUNKS)
    local_dir = make_workdir(tmp_path / "local", dense_model, config)
    (local_dir / "data" / "alpha.txt").write_text(sample_text(20000, seed=3), encoding="utf-8")
    snakemake(local_dir, "-c1", SHARD, env=clean_env())
    full = [(str(LIMIT_CHUNKS), "0", str(LIMIT_CHUNKS))]
    assert _COMPUTING.findall((local_dir / SHARD_LOG).read_text()) == full

    workdir = make_workdir(tmp_path / "slurm", dense_model, config)
    shutil.copyfile(local_dir / "data" / "alpha.txt", workdir / "data" / "alpha.txt")
    profile = profile_copy(tmp_path / "profile", cluster)
    collect = profile["set-resources"]["collect"]
    assert "--signal=TERM@" in collect["slurm_extra"]  # the profile's own mechanism
    collect["runtime"] = LIMIT_MINUTES
    collect["slurm_extra"] = f"'--signal=TERM@{SIGNAL_LEAD}'"
    (tmp_path / "profile" / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    log = run_once_hurt(tmp_path, workdir, tmp_path / "profile", delay=str(CHUNK_DELAY))

    failed, _ = retry_of(workdir)
    assert failed["TimeLimit"] == f"00:0{LIMIT_MINUTES}:00", failed
    # the first attempt saved its work on SIGTERM (its log, shown by show-failed-logs
    # before the retry overwrote it) ...
    m = re.search(r"terminated by SIGTERM after chunk (\d+)", log)
    assert m is not None, log[-5000:]
    reached = int(m.group(1))
    assert 0 < reached < LIMIT_CHUNKS
    # ... ahead of the limit: the job ended on its own, not killed at the limit
    assert failed["JobState"] == "FAILED" and failed["ExitCode"] != "0:0", failed
    assert _seconds(failed["RunTime"]) < 60 * LIMIT_MINUTES, failed
    # ... and the retry went on from there
    assert_resumed(workdir, local_dir, reached=reached, last=LIMIT_CHUNKS)
