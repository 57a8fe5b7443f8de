"""Workflow datasets whose text the model makes: ``format: chat`` (rendered with the
model's template) and ``generate:`` (written by the model), planned, run up to their
tokens, and refused at start-up when misconfigured."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_workflow import SNAKEMAKE, dry_run, load_config, make_workdir, snakemake
from tinymodels import CHATML_TOKENS

from imatrix.llama_api import load_model, tokenize
from imatrix.workflow.datasets import RECORD_SEPARATOR

pytestmark = pytest.mark.timeout(900)

M = "tiny"
CHAT = [
    {
        "messages": [
            {"role": "user", "content": "the old house"},
            {"role": "assistant", "content": "was new"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "at night"},
            {"role": "assistant", "content": "a light"},
        ]
    },
]


def config(**chat: str) -> dict:
    cfg = load_config()
    cfg["datasets"] = {
        "alpha": cfg["datasets"]["alpha"],
        "chat": {"path": "data/chat.jsonl", "format": "chat", **chat},
        "gen": {"generate": {"prompts": "data/prompts.txt", "tokens": 24, "seed": 3, "threads": 1}},
    }
    cfg["collect"]["shards"] = 1
    return cfg


def workdir(path: Path, model: Path, cfg: dict) -> Path:
    wd = make_workdir(path, model, cfg)
    (wd / "data" / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    (wd / "data" / "prompts.txt").write_text("The old house\nIn the night\n")
    return wd


def test_chat_and_generated_datasets_plan_and_tokenize(tmp_path: Path, chat_model: Path) -> None:
    wd = workdir(tmp_path / "w", chat_model, config())
    counts, out = dry_run(wd)
    assert counts["generate_dataset"] == 1 and counts["model_dataset_text"] == 2, out
    assert counts["tokenize"] == 3 and counts["collect"] == 3, out
    targets = [f"results/{M}/tokens/{d}.npy" for d in ("chat", "gen")]
    snakemake(wd, "-c2", *targets)
    records = [
        json.loads(x) for x in (wd / f"results/{M}/generated/gen.jsonl").read_text().splitlines()
    ]
    assert [r["prompt"] for r in records] == ["The old house", "In the night"]
    assert all(r["seed"] == 3 and r["threads"] == 1 for r in records)
    gen_text = (wd / f"results/{M}/datasets/gen.txt").read_text(encoding="utf-8")
    assert gen_text == RECORD_SEPARATOR.join(r["text"] for r in records)
    chat_text = (wd / f"results/{M}/datasets/chat.txt").read_text(encoding="utf-8")
    assert chat_text == (
        "<|im_start|>user\nthe old house<|im_end|>\n<|im_start|>assistant\nwas new<|im_end|>\n"
        "<|im_start|>user\nat night<|im_end|>\n<|im_start|>assistant\na light<|im_end|>\n"
    )
    meta = {
        d: json.loads((wd / f"results/{M}/tokens/{d}.json").read_text()) for d in ("chat", "gen")
    }
    assert meta["chat"]["parse_special"] is True and meta["gen"]["parse_special"] is False
    tokens = np.load(wd / f"results/{M}/tokens/chat.npy")
    with load_model(chat_model, vocab_only=True) as m:
        start = int(tokenize(m, CHATML_TOKENS[0], add_special=False, parse_special=True)[0])
    assert int(np.count_nonzero(tokens == start)) == 4


def start_up_error(wd: Path) -> str:
    proc = subprocess.run(
        [*SNAKEMAKE, "-n", "-c1", "--configfile", "config.yaml"],
        cwd=wd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out, out
    lines = [x for x in out.splitlines() if "invalid config" in x]
    assert len(lines) == 1, out
    return lines[0]


def test_config_errors_fail_at_start_up(tmp_path: Path, dense_model: Path) -> None:
    wd = workdir(tmp_path / "w", dense_model, config(template="nope"))
    line = start_up_error(wd)
    assert "datasets.chat.template: unknown chat template 'nope'" in line and "chatml" in line
    # the tiny dense model has no chat template
    (wd / "config.yaml").write_text(json.dumps(config()))
    line = start_up_error(wd)
    assert "dataset 'chat': models/tiny.gguf has no chat template; set datasets.chat." in line
    (wd / "data" / "chat.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    line = start_up_error(wd)
    assert "data/chat.jsonl:1: record has no field 'messages'" in line
    wd = workdir(tmp_path / "w2", dense_model, config(template="chatml"))
    (wd / "data" / "prompts.txt").unlink()
    line = start_up_error(wd)
    assert "datasets.gen.generate.prompts: data/prompts.txt: no such file" in line
    assert not (wd / "results").exists()
