"""``imatrix generate``: the sampler, reproducibility, the JSONL it writes (a dataset the
workflow reads) and its bad input."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imatrix.errors import ImatrixError
from imatrix.generate import GenerateSettings, generate_file, prompt_rng, sample_token
from imatrix.workflow.datasets import RECORD_SEPARATOR, load_dataset_text

PROMPTS = "The old house\n\nIn the night the light\nA man who had made\n"
TOKENS = 12
CLI_TIMEOUT = 300


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    p = tmp_path / "prompts.txt"
    p.write_text(PROMPTS, encoding="utf-8")
    return p


def run(model: Path, prompts: Path, out: Path, seed: int, temperature: float = 1.0) -> bytes:
    settings = GenerateSettings(tokens=TOKENS, seed=seed, temperature=temperature, threads=1)
    generate_file(model, prompts, out, settings)
    return out.read_bytes()


def texts(jsonl: bytes) -> list[str]:
    return [json.loads(line)["text"] for line in jsonl.decode("utf-8").splitlines()]


def test_greedy_takes_the_first_highest_logit() -> None:
    logits = np.array([0.5, 2.0, -1.0, 2.0], dtype=np.float32)
    assert sample_token(logits, 0.0, random.Random(0)) == 1


def test_sampling_follows_softmax_at_the_temperature() -> None:
    logits = np.array([0.0, math.log(3.0)], dtype=np.float32)  # p = 1/4, 3/4 at T=1
    rng = random.Random(0)
    draws = [sample_token(logits, 1.0, rng) for _ in range(4000)]
    assert abs(np.mean(draws) - 0.75) < 0.03
    # T=2 flattens: p1 = sqrt(3) / (1 + sqrt(3))
    draws = [sample_token(logits, 2.0, rng) for _ in range(4000)]
    assert abs(np.mean(draws) - math.sqrt(3) / (1 + math.sqrt(3))) < 0.03


def test_prompt_streams_are_pinned() -> None:
    """The seeding scheme is part of the reproducibility promise: a change is a change of
    every generated dataset."""
    assert prompt_rng(1, 0).random() == random.Random("imatrix-generate:1:0").random()
    assert prompt_rng(1, 0).random() != prompt_rng(1, 1).random()
    assert prompt_rng(1, 0).random() != prompt_rng(2, 0).random()


def test_same_seed_same_text_other_seed_other_text(
    dense_model: Path, prompts: Path, tmp_path: Path
) -> None:
    first = run(dense_model, prompts, tmp_path / "a.jsonl", seed=7)
    assert run(dense_model, prompts, tmp_path / "b.jsonl", seed=7) == first
    other = run(dense_model, prompts, tmp_path / "c.jsonl", seed=8)
    recs = [json.loads(x) for x in first.decode().splitlines()]
    others = [json.loads(x) for x in other.decode().splitlines()]
    assert all(a["completion"] != b["completion"] for a, b in zip(recs, others, strict=True))
    # greedy does not depend on the seed
    greedy = run(dense_model, prompts, tmp_path / "d.jsonl", seed=1, temperature=0)
    again = run(dense_model, prompts, tmp_path / "e.jsonl", seed=2, temperature=0)
    assert texts(again) == texts(greedy) != texts(first)


def test_records_are_a_dataset_with_provenance(
    dense_model: Path, prompts: Path, tmp_path: Path
) -> None:
    out = tmp_path / "gen.jsonl"
    run(dense_model, prompts, out, seed=3)
    recs = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in recs] == [
        "The old house",
        "In the night the light",
        "A man who had made",
    ]
    from imatrix.hashing import sha256_file

    for r in recs:
        assert r["text"] == r["prompt"] + r["completion"]
        assert 0 < r["n_tokens"] <= TOKENS
        assert (r["seed"], r["temperature"], r["threads"]) == (3, 1.0, 1)
        assert r["model_sha256"] == sha256_file(dense_model)
    assert load_dataset_text(out) == RECORD_SEPARATOR.join(r["text"] for r in recs)


def test_jsonl_prompts_may_span_lines(dense_model: Path, tmp_path: Path) -> None:
    p = tmp_path / "prompts.jsonl"
    p.write_text(json.dumps({"prompt": "The old\nhouse"}) + "\n", encoding="utf-8")
    out = tmp_path / "gen.jsonl"
    run(dense_model, p, out, seed=1)
    assert json.loads(out.read_text(encoding="utf-8"))["prompt"] == "The old\nhouse"


def test_ignore_eos_gives_every_prompt_all_its_tokens(
    dense_model: Path, prompts: Path, tmp_path: Path
) -> None:
    """At a high temperature the tiny model draws its EOS within 64 tokens for the second
    prompt of seed 1 (pinned: the run is reproducible); with ignore_eos it never does."""
    counts = {}
    for ignore in (False, True):
        out = tmp_path / f"{ignore}.jsonl"
        settings = GenerateSettings(64, seed=1, temperature=100.0, threads=1, ignore_eos=ignore)
        generate_file(dense_model, prompts, out, settings)
        counts[ignore] = [json.loads(x)["n_tokens"] for x in out.read_text().splitlines()]
    assert counts[False][1] < 64 and counts[True] == [64, 64, 64], counts


@pytest.mark.parametrize("tokens", [0, -5])
def test_settings_refuse_nonpositive_tokens(tokens: int) -> None:
    with pytest.raises(ImatrixError, match="tokens to generate must be positive"):
        GenerateSettings(tokens=tokens, seed=1)


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imatrix", "generate", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("-n", "0"), "argument -n/--n-predict: must be positive, got 0"),
        (("-n", "-3"), "argument -n/--n-predict: must be positive, got -3"),
        (("-n", "4", "--temperature", "-1"), "argument --temperature: must be >= 0"),
    ],
)
def test_cli_argument_errors_exit_2(
    extra: tuple[str, ...], needle: str, dense_model: Path, prompts: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o.jsonl"
    proc = cli("-m", dense_model, "--prompts", prompts, "--seed", 1, "-o", out, *extra)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_cli_bad_prompts_file_exit_1(case: str, dense_model: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    if case == "empty":
        prompts.write_text("\n  \n")
    out = tmp_path / "o.jsonl"
    out.write_text("earlier\n")
    proc = cli("-m", dense_model, "--prompts", prompts, "-n", 4, "--seed", 1, "-o", out)
    want = "no such prompts file" if case == "missing" else "no prompts"
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1] == f"imatrix generate: error: {prompts}: {want}", proc.stderr
    assert out.read_text() == "earlier\n"  # nothing a user had is overwritten


def test_cli_writes_what_the_library_writes(
    dense_model: Path, prompts: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o.jsonl"
    proc = cli("-m", dense_model, "--prompts", prompts, "-n", 4, "--seed", 5, "-t", 1, "-o", out)
    assert proc.returncode == 0, proc.stderr
    lib = tmp_path / "lib.jsonl"
    generate_file(dense_model, prompts, lib, GenerateSettings(tokens=4, seed=5, threads=1))
    assert out.read_bytes() == lib.read_bytes()
