"""Calibration text written by the model itself, from prompts, reproducibly on a CPU.

Why: text a model generates follows its own distribution, which several quantizers
found to transfer best as calibration data, and it costs no download or licence.

Reproducibility: the sampler is ours, not llama.cpp's sampler chain (whose defaults and
order change between versions). For each prompt, plain softmax sampling over all
logits at the given temperature (0: greedy, the first highest logit), driven by
``random.Random(f"imatrix-generate:{seed}:{i}")`` for the i-th prompt: Python guarantees
that ``random()`` of a string-seeded ``Random`` gives the same sequence in every
version, and seeding per prompt keeps a prompt's text independent of the others. A
token is drawn by inverse CDF over float64 probabilities (cumulative sum,
``searchsorted``). Same model file, seed, temperature, token count and thread count on
the same llama.cpp build and CPU → the same text. What can change it: another thread
count, build, BLAS or CPU instruction set, or a GPU (the logits differ in the last bits,
and one differently drawn token changes everything after it); rarely, numpy's ``exp``
(its SIMD paths differ between CPUs) can move a draw that falls on a boundary.

Generation per prompt: the prompt is tokenized with the model's BOS (special tokens
not parsed), then up to ``tokens`` tokens are drawn, stopping early at an
end-of-generation token (EOS, EOT), which is not written; with ``ignore_eos`` those
tokens are never drawn (their logits masked, as llama.cpp's ``--ignore-eos`` does), so
every prompt gets exactly ``tokens`` tokens and a dataset's size is known in advance. A record's ``text`` is the
prompt followed by its continuation, so it reads as one text.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from imatrix import __version__
from imatrix.atomic import atomic_write
from imatrix.errors import ImatrixError
from imatrix.hashing import sha256_file
from imatrix.llama_api import Batch, Context, default_threads, load_model, tokenize
from imatrix.llama_text import end_of_generation_tokens, is_end_of_generation, token_piece
from imatrix.records import FORMAT_BY_SUFFIX, jsonl_records, read_utf8

log = logging.getLogger(__name__)

#: prefix of the per-prompt seed string (see the module docstring)
SEED_PREFIX = "imatrix-generate"
#: the record field the dataset reader takes as the text (its default ``text_column``)
TEXT_FIELD = "text"


@dataclass(frozen=True)
class GenerateSettings:
    """How text is generated: tokens per prompt, seed, temperature, CPU threads."""

    tokens: int
    seed: int
    temperature: float = 1.0
    threads: int | None = None
    #: never draw an end-of-generation token (llama.cpp's --ignore-eos): exactly
    #: ``tokens`` tokens per prompt
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.tokens <= 0:
            raise ImatrixError(f"tokens to generate must be positive, got {self.tokens}")
        if not self.temperature >= 0:
            raise ImatrixError(f"temperature must be >= 0, got {self.temperature}")


def read_prompts(path: str | Path) -> list[str]:
    """Prompts: a ``.jsonl`` file's ``prompt`` fields (a prompt may span lines), else
    one prompt per non-empty line of a UTF-8 text file."""
    p = Path(path)
    if not p.is_file():
        raise ImatrixError(f"{p}: no such prompts file")
    if FORMAT_BY_SUFFIX.get(p.suffix.lower()) == "jsonl":
        prompts = [s for s in jsonl_records(p, "prompt") if s.strip()]
    else:
        prompts = [s.strip() for s in read_utf8(p, "UTF-8 text").splitlines() if s.strip()]
    if not prompts:
        raise ImatrixError(f"{p}: no prompts")
    return prompts


def sample_token(logits: np.ndarray, temperature: float, rng: random.Random) -> int:
    """A token drawn from softmax(logits / temperature); greedy at temperature 0."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    cdf = np.cumsum(np.exp(z - z.max()))
    u = rng.random() * cdf[-1]
    return int(min(np.searchsorted(cdf, u, side="right"), cdf.size - 1))


def prompt_rng(seed: int, index: int) -> random.Random:
    """The random stream of the ``index``-th prompt (stable across Python versions)."""
    return random.Random(f"{SEED_PREFIX}:{seed}:{index}")


def generate_texts(
    model_path: str | Path, prompts: list[str], settings: GenerateSettings
) -> list[tuple[str, int]]:
    """Each prompt's continuation and its token count (see the module docstring)."""
    from tqdm import tqdm

    with load_model(model_path, n_gpu_layers=0) as model:
        encoded = [tokenize(model, p, add_special=True, parse_special=False) for p in prompts]
        banned = end_of_generation_tokens(model) if settings.ignore_eos else []
        longest = max(t.size for t in encoded)
        n_ctx = longest + settings.tokens
        out = []
        with (
            Context(model, n_ctx=n_ctx, n_batch=longest, n_threads=settings.threads) as ctx,
            tqdm(
                total=settings.tokens * len(prompts), unit="tok", desc="generate", disable=None
            ) as bar,
        ):
            batch = Batch(max(longest, 1))
            for i, toks in enumerate(encoded):
                ctx.clear()
                t0 = time.perf_counter()
                rng = prompt_rng(settings.seed, i)
                drawn = _continue(ctx, batch, toks, settings, rng, banned, bar)
                dt = time.perf_counter() - t0
                log.info("prompt %d/%d: %d tokens in %.1f s", i + 1, len(prompts), len(drawn), dt)
                text = b"".join(token_piece(model, t) for t in drawn).decode("utf-8", "replace")
                out.append((text, len(drawn)))
    return out


def _continue(
    ctx: Context,
    batch: Batch,
    prompt: np.ndarray,
    settings: GenerateSettings,
    rng: random.Random,
    banned: list[int],
    bar: Any,
) -> list[int]:
    """Draw up to ``settings.tokens`` tokens after ``prompt`` (stopping at an
    end-of-generation token, which is not returned), never one of ``banned``."""
    n = prompt.size
    last = np.zeros(n, dtype=np.int8)
    last[-1] = 1
    ctx.decode_tokens(batch, prompt, np.arange(n, dtype=np.int32), 0, last)
    drawn: list[int] = []
    while True:
        logits = ctx.logits(1)[0]
        if banned:
            logits = logits.copy()
            logits[banned] = -np.inf
        tok = sample_token(logits, settings.temperature, rng)
        if is_end_of_generation(ctx.model, tok):
            bar.update(settings.tokens - len(drawn))
            return drawn
        drawn.append(tok)
        bar.update(1)
        if len(drawn) == settings.tokens:
            return drawn
        pos = np.array([n + len(drawn) - 1], dtype=np.int32)
        ctx.decode_tokens(batch, np.array([tok], dtype=np.int32), pos, 0, True)


def generate_records(
    model_path: str | Path, prompts_path: str | Path, settings: GenerateSettings
) -> list[dict[str, Any]]:
    """One JSON record per prompt: ``text`` (prompt + continuation, what the dataset
    reader takes), the continuation alone, and the provenance needed to make it again."""
    prompts = read_prompts(prompts_path)
    settings = replace(settings, threads=settings.threads or default_threads())
    texts = generate_texts(model_path, prompts, settings)
    model_sha = sha256_file(model_path)
    return [
        {
            TEXT_FIELD: prompt + completion,
            "prompt": prompt,
            "completion": completion,
            "n_tokens": n,
            "seed": settings.seed,
            "temperature": settings.temperature,
            "threads": settings.threads,
            "ignore_eos": settings.ignore_eos,
            "model": str(model_path),
            "model_sha256": model_sha,
            "version": __version__,
        }
        for prompt, (completion, n) in zip(prompts, texts, strict=True)
    ]


def generate_file(
    model_path: str | Path,
    prompts_path: str | Path,
    output: str | Path,
    settings: GenerateSettings,
) -> list[dict[str, Any]]:
    """Generate text for every prompt into a JSONL dataset ``output`` (atomically)."""
    records = generate_records(model_path, prompts_path, settings)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write(output, lines.encode("utf-8"))
    total = sum(int(r["n_tokens"]) for r in records)
    log.info("%s: %d prompts, %d tokens generated", output, len(records), total)
    return records
