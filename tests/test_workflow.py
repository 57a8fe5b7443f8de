"""The Snakemake workflow end to end, through the Snakemake CLI, on the tiny dense model.

Each run happens in its own working directory holding the tiny model, two generated
datasets (a text file and a JSONL file) and tests/workflow_config/config.yaml; the
workflow itself is this checkout's Snakefile. Two directories are run in full from
scratch (A and B); the other tests reuse them. What is proven: the full DAG runs; a dry
run lists exactly the expected jobs; the merged imatrix of 3 shards x 2 datasets equals
one unsharded collection per dataset combined with the weights; deleting a shard reruns
only that shard and what depends on it; a collect job killed mid-way resumes from its
checkpoint to the same bytes; a config change that does not touch collection does not
recollect; bad configs fail before any job; two runs from scratch give identical bytes.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from imatrix.formats import read_imatrix, write_imatrix
from imatrix.hashing import sha256_file
from imatrix.model import combine

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "workflow" / "Snakefile"
CONFIG = ROOT / "tests" / "workflow_config" / "config.yaml"
RUN_TIMEOUT = 900
SNAKEMAKE = (sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tinymodels import sample_text  # noqa: E402

pytestmark = pytest.mark.timeout(1800)

M = "tiny"
#: every file the test config asks for (paths relative to the working directory)
TARGETS = [
    f"results/{M}/imatrix.gguf",
    f"results/{M}/imatrix.dat",
    f"results/{M}/imatrix.compat.gguf",
    f"results/{M}/stats/tensors.parquet",
    f"results/{M}/stats/layers.parquet",
    f"results/{M}/stats/coverage.parquet",
    f"results/{M}/stats/convergence.parquet",
    f"results/{M}/stats/convergence.png",
    f"results/{M}/report/statistics.html",
    f"results/{M}/quant/{M}-Q4_K_M.gguf",
    f"results/{M}/quant/{M}-IQ3_XXS.gguf",
    f"results/{M}/quant/noimatrix/{M}-Q4_K_M.gguf",
    f"results/{M}/eval/summary.parquet",
    f"results/{M}/report/evaluation.html",
    f"results/{M}/eval/kld_vs_size.png",
]
SHARDS = [f"results/{M}/shards/{d}/{s}.gguf" for d in ("alpha", "beta") for s in range(3)]
#: outputs that must be byte-identical between two runs from scratch
REPRODUCIBLE = [
    *SHARDS,
    f"results/{M}/imatrix.gguf",
    f"results/{M}/imatrix.dat",
    f"results/{M}/imatrix.compat.gguf",
    f"results/{M}/stats/tensors.parquet",
    f"results/{M}/stats/layers.parquet",
    f"results/{M}/stats/coverage.parquet",
    f"results/{M}/quant/{M}-Q4_K_M.gguf",
    f"results/{M}/quant/{M}-IQ3_XXS.gguf",
    f"results/{M}/quant/noimatrix/{M}-Q4_K_M.gguf",
    f"results/{M}/eval/summary.parquet",
]


# --- helpers ------------------------------------------------------------------------


def make_workdir(path: Path, model: Path, config: dict | None = None) -> Path:
    """A working directory with the tiny model, the datasets and a config."""
    (path / "models").mkdir(parents=True)
    (path / "data").mkdir()
    shutil.copyfile(model, path / "models" / "tiny.gguf")
    (path / "data" / "alpha.txt").write_text(sample_text(2500, seed=3), encoding="utf-8")
    sentences = sample_text(3000, seed=4).split(". ")
    with open(path / "data" / "beta.jsonl", "w", encoding="utf-8") as fh:
        for i in range(0, len(sentences), 10):
            fh.write(json.dumps({"id": i, "text": ". ".join(sentences[i : i + 10])}) + "\n")
    (path / "data" / "eval.txt").write_text(sample_text(1200, seed=5), encoding="utf-8")
    cfg = config if config is not None else load_config()
    (path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def load_config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def snakemake(
    workdir: Path, *args: str, config: str = "config.yaml", check: bool = True, env=None
) -> subprocess.CompletedProcess:
    # options taking several values (--configfile, --resources) must not swallow targets
    cmd = [*SNAKEMAKE, *args, "--configfile", config]
    proc = subprocess.run(
        cmd,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a Snakemake (dry) run."""
    counts: dict[str, int] = {}
    lines = output.splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.startswith("Job stats:"))
    except StopIteration:
        return counts
    for ln in lines[start + 3 :]:
        parts = ln.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        if parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


def dry_run(workdir: Path, *args: str, config: str = "config.yaml") -> tuple[dict[str, int], str]:
    proc = snakemake(workdir, "-n", "-c2", *args, config=config)
    out = proc.stdout + proc.stderr
    return job_counts(out), out


def run(workdir: Path, *args: str, config: str = "config.yaml") -> str:
    proc = snakemake(workdir, "-c2", *args, config=config)
    return proc.stdout + proc.stderr


EXPECTED_JOBS = {
    "dataset_text": 1,  # beta is JSONL
    "tokenize": 2,
    "collect": 6,
    "merge": 1,
    "convert": 2,
    "stats": 1,
    "coverage": 1,
    "convergence": 1,
    "report_statistics": 1,
    "quantize": 2,
    "quantize_noimatrix": 1,  # IQ3_XXS needs an imatrix
    "evaluate": 1,
    "report_evaluation": 1,
    "plot_evaluation": 1,
    "all": 1,
}


# --- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_a(tmp_path_factory: pytest.TempPathFactory, dense_model: Path) -> Path:
    wd = make_workdir(tmp_path_factory.mktemp("wf") / "a", dense_model)
    counts, _ = dry_run(wd)
    assert counts == EXPECTED_JOBS
    run(wd)
    return wd


@pytest.fixture(scope="module")
def run_b(tmp_path_factory: pytest.TempPathFactory, dense_model: Path, run_a: Path) -> Path:
    wd = make_workdir(tmp_path_factory.mktemp("wf") / "b", dense_model)
    run(wd)
    return wd


# --- tests --------------------------------------------------------------------------


def test_dry_run_lists_expected_jobs(tmp_path: Path, dense_model: Path) -> None:
    wd = make_workdir(tmp_path / "w", dense_model)
    counts, out = dry_run(wd)
    assert counts == EXPECTED_JOBS
    for s in SHARDS:
        assert s in out
    assert not (wd / "results").exists()


def test_full_dag_runs(run_a: Path) -> None:
    for t in [*TARGETS, *SHARDS]:
        assert (run_a / t).is_file(), t
    plots = sorted((run_a / f"results/{M}/stats/plots").glob("*.png"))
    assert plots
    # nothing left to do, and no checkpoint left behind
    counts, out = dry_run(run_a)
    assert counts == {}, out
    assert not list((run_a / "results").rglob("*.checkpoint"))
    # logs and benchmarks where the design says
    assert (run_a / f"logs/{M}/collect/alpha/0.log").is_file()
    assert (run_a / f"results/benchmarks/{M}/collect/beta/2.tsv").is_file()
    assert (run_a / f"results/benchmarks/{M}/quantize/IQ3_XXS.tsv").is_file()
    # the quantized models used the merged imatrix; the comparison did not
    import pandas as pd

    summary = pd.read_parquet(run_a / f"results/{M}/eval/summary.parquet")
    assert summary["is_base"].tolist() == [True, False, False, False]
    assert summary["imatrix"].tolist() == [False, True, True, False]
    assert set(summary["type"]) == {"F16", "Q4_K_M", "IQ3_XXS"}
    assert summary["eval_set"].tolist() == ["default"] * 4  # evaluate.text: one set


#: a file Snakemake's report embeds: data:MIME;charset=ENC;filename=NAME;base64,DATA
_EMBEDDED = re.compile(
    r"data:[\w/+.-]+;charset=[\w-]+;filename=([^;\"']+);base64,([A-Za-z0-9+/=]+)"
)


def embedded_files(report: Path) -> dict[str, list[bytes]]:
    """Every file embedded in a Snakemake HTML report, by file name, decoded."""
    out: dict[str, list[bytes]] = {}
    for name, data in _EMBEDDED.findall(report.read_text(encoding="utf-8")):
        out.setdefault(name, []).append(base64.b64decode(data))
    return out


def test_report(run_a: Path, tmp_path: Path) -> None:
    """The report holds the statistics tables, the evaluation table and every plot,
    each equal to the file the workflow wrote (not only announced in the log)."""
    import pandas as pd

    report = tmp_path / "report.html"
    snakemake(run_a, "--report", str(report))
    files = embedded_files(report)
    results = run_a / f"results/{M}"
    stats_html = (results / "report/statistics.html").read_bytes()
    eval_html = (results / "report/evaluation.html").read_bytes()
    assert files.get("statistics.html") == [stats_html]
    assert files.get("evaluation.html") == [eval_html]
    # the tables themselves: every tensor and layer, every evaluated model
    stats = stats_html.decode()
    assert "<h2>Layers</h2>" in stats and "<h2>Tensors</h2>" in stats
    tensors = pd.read_parquet(results / "stats/tensors.parquet")
    layers = pd.read_parquet(results / "stats/layers.parquet")
    conv = pd.read_parquet(results / "stats/convergence.parquet")
    assert set(conv[conv["view"] == "shard"]["shard"]) == {0, 1, 2}
    assert (conv["view"] == "merged").any()
    # + three header rows
    assert stats.count("</tr>") == len(tensors) + len(layers) + len(conv) + 3
    for name in tensors["name"]:
        assert f"<td>{name}</td>" in stats, name
    evaluation = eval_html.decode()
    assert "<h2>Evaluation against the base model</h2>" in evaluation
    summary = pd.read_parquet(results / "eval/summary.parquet")
    assert evaluation.count("</tr>") == len(summary) + 1  # header row + one per model
    for t in ("F16", "Q4_K_M", "IQ3_XXS"):
        assert f"<td>{t}</td>" in evaluation, t
    # every plot, as PNG, byte for byte
    plots = [*sorted((results / "stats/plots").glob("*.png")), results / "eval/kld_vs_size.png"]
    assert plots
    for png in [*plots, results / "stats/convergence.png"]:
        assert files.get(png.name) == [png.read_bytes()], png.name


def test_merge_equals_unsharded_collection(run_a: Path) -> None:
    """3 shards x 2 datasets merged == per dataset one collect over the same chunks,
    then combined with the weights (counts identical, sums within 1e-6 relative)."""
    from imatrix.collect import CollectSettings, collect

    cfg = load_config()
    c = cfg["collect"]
    whole = []
    for d in ("alpha", "beta"):
        out = run_a / f"unsharded-{d}.gguf"
        settings = CollectSettings(
            last_chunk=cfg["datasets"][d].get("chunks"),
            n_ctx=c["n_ctx"],
            n_batch=c["n_batch"],
            n_ubatch=c["n_ubatch"],
            threads=1,
            n_gpu_layers=0,
            compute_ppl=False,
            output_frequency=0,
        )
        tokens = run_a / f"results/{M}/tokens/{d}.npy"
        collect(run_a / "models/tiny.gguf", tokens, out, settings, dataset=d)
        whole.append(read_imatrix(out))
    ref = combine(whole, weights=[1.0, 2.0])
    merged = read_imatrix(run_a / f"results/{M}/imatrix.gguf")
    assert merged.datasets == ["alpha", "beta"] == ref.datasets
    assert merged.chunk_count == ref.chunk_count and merged.chunk_size == 128
    assert sorted(merged.entries) == sorted(ref.entries)
    for name, r in ref.entries.items():
        e = merged.entries[name]
        np.testing.assert_array_equal(e.counts, r.counts, err_msg=name)
        np.testing.assert_allclose(e.values, r.values, rtol=1e-6, atol=0, err_msg=name)
        # plain sums can cancel: bound the error by the sum of |x| <= sqrt(n * sum x^2)
        scale = np.sqrt(np.repeat(r.counts, r.row_size) * r.values)
        assert np.all(np.abs(e.sums - r.sums) <= 1e-6 * scale + 1e-6 * np.abs(r.sums)), name
    # provenance: the model's and every dataset's sha256
    assert merged.provenance.model_sha256 == sha256_file(run_a / "models/tiny.gguf")
    assert merged.provenance.dataset_sha256 == [
        sha256_file(run_a / "data/alpha.txt"),
        sha256_file(run_a / "results/datasets/beta.txt"),
    ]


def test_same_config_twice_gives_identical_bytes(run_a: Path, run_b: Path) -> None:
    for rel in REPRODUCIBLE:
        assert (run_a / rel).read_bytes() == (run_b / rel).read_bytes(), rel


def test_config_change_outside_collection_does_not_recollect(run_b: Path) -> None:
    cfg = load_config()
    cfg["quantize"]["types"].append("Q2_K")
    cfg["datasets"]["beta"]["weight"] = 3
    cfg["evaluate"]["chunks"] = 2
    cfg["collect"]["threads"] = 2  # how a shard is computed, not what it holds
    cfg["collect"]["ngl"] = 1
    cfg["collect"]["output_frequency"] = 5
    (run_b / "changed.yaml").write_text(yaml.safe_dump(cfg))
    counts, out = dry_run(run_b, config="changed.yaml")
    assert "collect" not in counts and "tokenize" not in counts, out
    assert counts["merge"] == 1  # the weight changed
    assert counts["quantize"] == 3  # the imatrix changed, and Q2_K is new
    assert counts["quantize_noimatrix"] == 1  # only Q2_K: the others do not use the imatrix
    # and a change that does touch collection reruns every shard
    cfg["collect"]["n_ctx"] = 64
    (run_b / "changed.yaml").write_text(yaml.safe_dump(cfg))
    counts, _ = dry_run(run_b, config="changed.yaml")
    assert counts["collect"] == 6


def test_deleted_shard_reruns_only_that_shard(run_a: Path) -> None:
    merged = (run_a / f"results/{M}/imatrix.gguf").read_bytes()
    others = {s: (run_a / s).stat().st_mtime_ns for s in SHARDS if s != SHARDS[1]}
    (run_a / SHARDS[1]).unlink()
    counts, out = dry_run(run_a)
    assert counts["collect"] == 1 and counts["merge"] == 1, out
    assert "tokenize" not in counts and "quantize_noimatrix" not in counts
    assert re.search(rf"output: {re.escape(SHARDS[1])}\n", out)
    run(run_a, f"results/{M}/imatrix.gguf")
    assert (run_a / f"results/{M}/imatrix.gguf").read_bytes() == merged
    assert {s: (run_a / s).stat().st_mtime_ns for s in others} == others


def _collect_pids(workdir: Path) -> list[int]:
    """Processes running this working directory's collect script."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(workdir) in cmd and ".collect.py" in cmd:
            pids.append(int(p.name))
    return pids


def test_killed_collect_resumes_from_checkpoint(run_a: Path) -> None:
    shard = SHARDS[2]  # alpha, the last 23 of its 67 chunks
    target = run_a / shard
    ckpt = Path(str(target) + ".checkpoint")
    before = target.read_bytes()
    target.unlink()
    proc = subprocess.Popen(
        [*SNAKEMAKE, "-c1", shard, "--configfile", "config.yaml"],
        cwd=run_a,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not ckpt.exists():
            assert proc.poll() is None, "snakemake ended before the first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        pids = _collect_pids(run_a)
        assert pids, "collect job not found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out
    assert not target.exists() and ckpt.exists()
    reached = read_imatrix(ckpt).provenance.chunk_reached
    assert 44 < reached < 67
    run(run_a, shard)
    log = (run_a / f"logs/{M}/collect/alpha/2.log").read_text()
    assert f"resuming from {ckpt.relative_to(run_a)} at chunk {reached}" in log
    assert target.read_bytes() == before
    assert not ckpt.exists()


def test_chunks_per_shard(run_a: Path, tmp_path: Path, dense_model: Path) -> None:
    """Shards of a fixed number of chunks: their count follows the token count (a
    Snakemake checkpoint after tokenization); the merge equals the 3-shard merge."""
    cfg = load_config()
    cfg["collect"]["chunks_per_shard"] = 30
    wd = make_workdir(tmp_path / "w", dense_model, cfg)
    run(wd, f"results/{M}/imatrix.gguf")
    assert sorted(p.name for p in (wd / f"results/{M}/shards/alpha").glob("*.gguf")) == [
        "0.gguf",
        "1.gguf",
        "2.gguf",
    ]  # 67 chunks
    assert [p.name for p in (wd / f"results/{M}/shards/beta").glob("*.gguf")] == ["0.gguf"]
    a = read_imatrix(run_a / f"results/{M}/imatrix.gguf")
    b = read_imatrix(wd / f"results/{M}/imatrix.gguf")
    assert b.datasets == a.datasets
    for name, e in a.entries.items():
        np.testing.assert_array_equal(b.entries[name].counts, e.counts)
        np.testing.assert_allclose(b.entries[name].values, e.values, rtol=1e-6)


def test_collect_jobs_get_their_own_gpu(tmp_path: Path, dense_model: Path) -> None:
    """With --resources gpu=2 and ngl > 0, concurrent collect jobs claim distinct
    devices (here the CPU build ignores the offload; IMATRIX_GPU_SLOTS stands in for
    the driver's device count)."""
    cfg = load_config()
    cfg["collect"]["ngl"] = 99
    wd = make_workdir(tmp_path / "w", dense_model, cfg)
    env = {**os.environ, "IMATRIX_GPU_SLOTS": "2", "TMPDIR": str(tmp_path)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    counts, _ = dry_run(wd, "--resources", "gpu=2")
    assert counts["collect"] == 6
    snakemake(wd, "-c2", f"results/{M}/imatrix.gguf", "--resources", "gpu=2", env=env)
    slots = []
    for log in sorted((wd / f"logs/{M}/collect").rglob("*.log")):
        m = re.search(r"claimed GPU slot (\d) of 2 \(CUDA_VISIBLE_DEVICES=\1\)", log.read_text())
        assert m, log
        slots.append(int(m.group(1)))
    assert set(slots) == {0, 1}


def _bad(cfg: dict, change) -> dict:
    change(cfg)
    return cfg


BAD_CONFIGS = {
    "unknown quant type": (
        lambda c: c["quantize"]["types"].append("Q9_X"),
        "quantize.types: unknown quantization type 'Q9_X'",
    ),
    "missing dataset file": (
        lambda c: c["datasets"]["alpha"].update(path="data/missing.txt"),
        "datasets.alpha.path: data/missing.txt: no such file",
    ),
    "shards < 1": (
        lambda c: c["collect"].update(shards=0),
        "0 is less than the minimum of 1",
    ),
    "missing model file": (
        lambda c: c["models"]["tiny"].update(path="models/none.gguf"),
        "models.tiny.path: models/none.gguf: no such file",
    ),
    "until_converged <= 0": (
        lambda c: c["collect"].update(until_converged="0:2"),
        "collect.until_converged: EPS must be a positive number",
    ),
    "unknown key": (
        lambda c: c["collect"].update(n_context=256),
        "Additional properties are not allowed ('n_context' was unexpected)",
    ),
    # one line naming the key: these are checked as whole lines of the output
    "sample seed not an integer": (
        lambda c: c["datasets"]["alpha"].update(sample={"chunks": 3, "seed": "x"}),
        "invalid config: datasets.alpha.sample.seed: 'x' is not of type 'integer'",
    ),
    "sample chunks < 1": (
        lambda c: c["datasets"]["alpha"].update(sample={"chunks": 0, "seed": 1}),
        "invalid config: datasets.alpha.sample.chunks: 0 is less than the minimum of 1",
    ),
    "unknown boundary": (
        lambda c: c["datasets"]["beta"].update(boundary="paragraph"),
        "invalid config: datasets.beta.boundary: 'paragraph' is not one of ['stream', 'document']",
    ),
    "evaluation text is a calibration text": (
        lambda c: c["evaluate"].update(text=None, texts={"ok": "data/eval.txt", "web": "x.txt"}),
        "invalid config: evaluate.texts.web: x.txt is the text of calibration dataset "
        "'alpha'; evaluate on held-out text",
    ),
    "text and texts": (
        lambda c: c["evaluate"].update(texts={"web": "data/eval.txt"}),
        "invalid config: evaluate: give either text or texts, not both",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_fails_before_any_job(case: str, tmp_path: Path, dense_model: Path) -> None:
    change, message = BAD_CONFIGS[case]
    wd = make_workdir(tmp_path / "w", dense_model, _bad(load_config(), change))
    shutil.copyfile(wd / "data/alpha.txt", wd / "x.txt")  # a calibration text by another name
    proc = snakemake(wd, "-c1", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert message in out, out
    if message.startswith("invalid config: "):
        assert message in out.splitlines(), out
    assert not (wd / "results").exists() and not (wd / "logs").exists()


def test_lint_and_format() -> None:
    """`snakemake --lint` on the default (demo) config and `snakefmt --check` are clean."""
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "Congratulations" in proc.stdout + proc.stderr, proc.stderr
    snakefmt = shutil.which("snakefmt") or str(Path(sys.executable).parent / "snakefmt")
    proc = subprocess.run(
        [snakefmt, "--check", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr


def test_merge_refuses_a_shard_of_another_text(run_b: Path) -> None:
    """A shard collected on a different version of the dataset's text is refused."""
    from imatrix.collect import CollectSettings, collect

    odd = run_b / "odd"
    odd.mkdir()
    (odd / "alpha.txt").write_text(sample_text(2500, seed=99), encoding="utf-8")
    from imatrix.tokenize import tokenize_file

    tokenize_file(run_b / "models/tiny.gguf", odd / "alpha.txt", odd / "alpha.npy")
    collect(
        run_b / "models/tiny.gguf",
        odd / "alpha.npy",
        odd / "shard.gguf",
        CollectSettings(
            first_chunk=0,
            last_chunk=22,
            n_ctx=128,
            n_batch=256,
            n_ubatch=128,
            threads=1,
            n_gpu_layers=0,
            compute_ppl=False,
            output_frequency=0,
        ),
        dataset="alpha",
    )
    data = read_imatrix(odd / "shard.gguf")
    write_imatrix(data, run_b / SHARDS[0])  # newer than the merge: it reruns
    proc = snakemake(run_b, "-c1", f"results/{M}/imatrix.gguf", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    log = (run_b / f"logs/{M}/merge.log").read_text()
    assert "shards disagree on the text of dataset 'alpha' (sha256)" in log, out + log


def test_moe_health_gate_refuses_and_writes_nothing(tmp_path: Path, moe_model: Path) -> None:
    """On the tiny MoE model, a `health:` block whose min_expert_tokens no expert reaches
    and that raises expert_coverage to "fail" stops the merge: Snakemake fails, the merge
    log names each expert with its count (the counts the shard holds), and no merged
    imatrix (nor anything after it) exists. Lowering the level lets the merge through,
    and coverage.parquet holds the shard's counts for the dataset and the merge."""
    import pandas as pd

    cfg = load_config()
    cfg["datasets"] = {"alpha": {"path": "data/alpha.txt", "chunks": 2}}
    cfg["collect"].update(shards=1)
    cfg["health"] = {"min_expert_tokens": 10**6, "fail_on": ["expert_coverage"]}
    wd = make_workdir(tmp_path / "w", moe_model, cfg)
    proc = snakemake(wd, "-c1", f"results/{M}/imatrix.gguf", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    log = (wd / f"logs/{M}/merge.log").read_text()
    assert "health check failed" in log and "[fail] expert_coverage: 6 finding(s)" in log, log
    shard = read_imatrix(wd / f"results/{M}/shards/alpha/0.gguf")
    up = shard.entries["blk.1.ffn_up_exps.weight"].counts
    listed = ", ".join(f"#{i} ({int(c)})" for i, c in enumerate(up))
    assert (
        f"blk.1.ffn_up_exps.weight: 4 of 4 experts saw fewer than 1000000 tokens: {listed};" in log
    )
    assert up.sum() == 2 * 2 * 128  # 2 chunks of 128 tokens, 2 experts per token
    assert not (wd / f"results/{M}/imatrix.gguf").exists()
    assert sorted(p.name for p in (wd / f"results/{M}").iterdir()) == ["shards", "tokens"]

    cfg["health"]["warn_on"], cfg["health"]["fail_on"] = ["expert_coverage"], []
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    run(wd, f"results/{M}/stats/coverage.parquet")
    cov = pd.read_parquet(wd / f"results/{M}/stats/coverage.parquet")
    for dataset in ("alpha", None):
        rows = cov[cov["dataset"] == dataset] if dataset else cov[cov["dataset"].isna()]
        got = rows[rows["name"] == "blk.1.ffn_up_exps.weight"]["tokens"].tolist()
        assert got == [int(c) for c in up], (dataset, got)


def test_eval_sets_give_an_eval_set_column(run_a: Path, tmp_path: Path) -> None:
    """evaluate.texts: every quant on every set, sets in config order, named in the
    eval_set column; a set on the single run's text gives that run's rows; only the
    evaluation reruns."""
    import pandas as pd

    wd = tmp_path / "w"
    shutil.copytree(run_a, wd, symlinks=True)  # keeps mtimes and Snakemake's records
    run(wd)  # up to date first: other tests leave run_a with a shard rebuilt after its merge
    (wd / "data/eval2.txt").write_text(sample_text(1200, seed=6), encoding="utf-8")
    cfg = load_config()
    cfg["evaluate"]["text"] = None
    cfg["evaluate"]["texts"] = {"prose": "data/eval.txt", "other": "data/eval2.txt"}
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    counts, out = dry_run(wd)
    assert counts == {"evaluate": 1, "plot_evaluation": 1, "report_evaluation": 1, "all": 1}, out
    run(wd)
    df = pd.read_parquet(wd / f"results/{M}/eval/summary.parquet")
    single = pd.read_parquet(run_a / f"results/{M}/eval/summary.parquet")
    assert df["eval_set"].tolist() == ["prose"] * 4 + ["other"] * 4
    assert df["text"].tolist() == ["data/eval.txt"] * 4 + ["data/eval2.txt"] * 4
    assert (df.groupby("eval_set")["is_base"].sum() == 1).all()
    prose = df[df["eval_set"] == "prose"].drop(columns="eval_set").reset_index(drop=True)
    pd.testing.assert_frame_equal(prose, single.drop(columns="eval_set"))
    other = df[df["eval_set"] == "other"]
    assert not np.allclose(other["ppl"], prose["ppl"])


def test_sampled_and_document_datasets(tmp_path: Path, dense_model: Path) -> None:
    """sample and boundary: document through the workflow: the tokens hold the chosen
    chunks (JSONL records read by the tokenizer, no text extraction), the shards take
    them, and the merged imatrix records the choice per dataset."""
    cfg = load_config()
    cfg["datasets"]["alpha"]["sample"] = {"chunks": 9, "seed": 11}
    cfg["datasets"]["beta"]["boundary"] = "document"
    wd = make_workdir(tmp_path / "w", dense_model, cfg)
    counts, _ = dry_run(wd)
    assert "dataset_text" not in counts and counts["tokenize"] == 2
    run(wd, f"results/{M}/imatrix.gguf")
    alpha = json.loads((wd / f"results/{M}/tokens/alpha.json").read_text())
    beta = json.loads((wd / f"results/{M}/tokens/beta.json").read_text())
    assert alpha["n_tokens"] == 9 * 128 and alpha["selection"]["sample"] == {
        "chunks": 9,
        "seed": 11,
    }
    assert beta["text"] == "data/beta.jsonl" and beta["selection"]["boundary"] == "document"
    tokens = np.load(wd / f"results/{M}/tokens/beta.npy").reshape(-1, 128)
    assert (tokens[:, 0] == 1).all() and (tokens[:, 1:] != 1).all()  # BOS only at chunk starts
    merged = read_imatrix(wd / f"results/{M}/imatrix.gguf")
    chosen = [json.loads(s) for s in merged.provenance.dataset_selection]
    assert [c["boundary"] for c in chosen] == ["stream", "document"]
    assert chosen[0]["tokens_sha256"] == alpha["tokens_sha256"]
    assert chosen[1]["tokens_sha256"] == beta["tokens_sha256"]
    # beta (weight 2): its first 12 chunks at most (datasets.beta.chunks)
    assert merged.chunk_count == 9 + 2 * min(12, tokens.shape[0])
