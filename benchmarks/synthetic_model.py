#!/usr/bin/env python
"""Write a random-weight GGUF model of real size, for speed and memory measurements.

FOR SPEED AND MEMORY MEASUREMENTS ONLY: the weights are random, so perplexity,
KL divergence, imatrix statistics or quantization quality measured on these models
mean nothing. What is real: tensor shapes and count, file size, vocabulary size (a
SentencePiece-style vocabulary of 32,000 or 151,936 pieces, so the output projection
and the tokenizer cost what they cost in real models), and the architecture llama.cpp
runs (``llama`` dense, ``qwen3moe`` mixture of experts).

Why random bits instead of normal samples: the writer has to keep up with the disk
(hundreds of MB/s), and drawing normals and converting them to F16 costs more than
that. Each tensor is filled from raw generator output with the exponent pinned to a
two-octave band around 1/sqrt(fan-in), so activations stay finite through every layer.
Tensors are generated one at a time and streamed to the file, so memory stays at the
size of the largest tensor. Deterministic: the same arguments give the same bytes.

    python benchmarks/synthetic_model.py --arch llama --params 1B -o llama-1b.gguf
    python benchmarks/synthetic_model.py --arch qwen3moe --params 1B --experts 64 -o moe.gguf
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import string
import time
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

log = logging.getLogger("synthetic_model")

ARCHS = ("llama", "qwen3moe")
PARAMS = ("tiny", "1B", "7B")
DTYPES = ("f16", "bf16")
CTX_TRAIN = 4096
RMS_EPS = 1e-6
# GGUF file types (llama_ftype) and token types (llama_token_type)
FTYPE = {"f16": 1, "bf16": 32}
BLOCK_WORDS = 1 << 21  # 16 MiB of generator output per task
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_BYTE = 1, 2, 3, 6
SPACE = "\u2581"  # SentencePiece's word-start marker
# bit layout of a 16-bit float: (exponent shift, exponent bias, mask of the bits left random:
# sign, lowest exponent bit and mantissa)
BITS = {"f16": (10, 15, 0x87FF), "bf16": (7, 127, 0x80FF)}


@dataclass(frozen=True)
class Shape:
    """Hyperparameters of one synthetic model (n_expert = 0: dense)."""

    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_expert: int = 0
    n_expert_used: int = 0


# Real models' shapes: llama 1B is TinyLlama-1.1B, 7B is Llama-2-7B; qwen3moe keeps
# Qwen3-30B-A3B's proportions (head_dim 128, 4 KV heads, 8 of 64+ experts, expert FFN
# narrower than the model) scaled to ~1B and ~7B in total. "tiny" is for tests.
PRESETS: dict[tuple[str, str], Shape] = {
    ("llama", "tiny"): Shape(128, 256, 2, 4, 2, 32, 32000),
    ("llama", "1B"): Shape(2048, 5632, 22, 32, 4, 64, 32000),
    ("llama", "7B"): Shape(4096, 11008, 32, 32, 32, 128, 32000),
    ("qwen3moe", "tiny"): Shape(128, 64, 2, 4, 2, 32, 151936, 8, 2),
    ("qwen3moe", "1B"): Shape(1024, 256, 12, 16, 4, 128, 151936, 64, 8),
    ("qwen3moe", "7B"): Shape(2048, 768, 20, 32, 4, 128, 151936, 64, 8),
}


def vocabulary(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary of exactly ``n_vocab`` pieces.

    Control tokens, the 256 byte fallbacks, then letters, digits and punctuation, then
    every lowercase string of 2, 3, 4... letters with and without the word-start marker,
    shortest first, so ordinary text splits into short pieces as in a real tokenizer.
    Longer pieces score higher, so the tokenizer prefers them.
    """
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_BYTE] * 256
    singles = string.ascii_letters + string.digits + string.punctuation
    pieces: Iterator[str] = itertools.chain(
        [SPACE],
        (p for c in singles for p in (SPACE + c, c)),
        (
            p
            for n in itertools.count(2)
            for t in itertools.product(string.ascii_lowercase, repeat=n)
            for p in (SPACE + "".join(t), "".join(t))
        ),
    )
    extra = n_vocab - len(tokens)
    if extra < 1:
        raise SystemExit(f"--vocab must be above {len(tokens)}")
    tokens += list(itertools.islice(pieces, extra))
    types += [TOKEN_NORMAL] * extra
    scores = [0.0] * 259 + [float(len(t)) for t in tokens[259:]]
    return tokens, scores, types


def tensor_shapes(arch: str, s: Shape) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) of every tensor, in file order; 1-D ones are norms (F32)."""
    q, kv = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    yield "token_embd.weight", (s.n_vocab, s.n_embd)
    for i in range(s.n_layer):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", (s.n_embd,)
        yield p + "attn_q.weight", (q, s.n_embd)
        yield p + "attn_k.weight", (kv, s.n_embd)
        yield p + "attn_v.weight", (kv, s.n_embd)
        yield p + "attn_output.weight", (s.n_embd, q)
        if arch == "qwen3moe":
            yield p + "attn_q_norm.weight", (s.head_dim,)
            yield p + "attn_k_norm.weight", (s.head_dim,)
        yield p + "ffn_norm.weight", (s.n_embd,)
        if s.n_expert:
            yield p + "ffn_gate_inp.weight", (s.n_expert, s.n_embd)
            yield p + "ffn_gate_exps.weight", (s.n_expert, s.n_ff, s.n_embd)
            yield p + "ffn_up_exps.weight", (s.n_expert, s.n_ff, s.n_embd)
            yield p + "ffn_down_exps.weight", (s.n_expert, s.n_embd, s.n_ff)
        else:
            yield p + "ffn_gate.weight", (s.n_ff, s.n_embd)
            yield p + "ffn_up.weight", (s.n_ff, s.n_embd)
            yield p + "ffn_down.weight", (s.n_embd, s.n_ff)
    yield "output_norm.weight", (s.n_embd,)
    yield "output.weight", (s.n_vocab, s.n_embd)


def n_params(arch: str, s: Shape) -> int:
    return sum(math.prod(shape) for _, shape in tensor_shapes(arch, s))


def is_f32(name: str, shape: tuple[int, ...]) -> bool:
    """Norms and the expert router stay F32, as llama.cpp's converter leaves them."""
    return len(shape) == 1 or name.endswith("ffn_gate_inp.weight")


def random_words(pool: Executor, seed: int, index: int, out: np.ndarray) -> None:
    """Fill ``out`` (uint64) with random words for tensor number ``index``.

    Generated in fixed blocks, each from its own generator seeded by (seed, tensor,
    block), on the pool's threads (the generators release the GIL): the result does
    not depend on the number of threads.
    """

    def fill(b0: int) -> None:
        ss = np.random.SeedSequence(seed, spawn_key=(index, b0 // BLOCK_WORDS))
        n = min(BLOCK_WORDS, out.size - b0)
        out[b0 : b0 + n] = np.random.SFC64(ss).random_raw(n)

    list(pool.map(fill, range(0, out.size, BLOCK_WORDS)))


def random_half(
    pool: Executor, seed: int, index: int, shape: tuple[int, ...], dtype: str, buf: np.ndarray
) -> np.ndarray:
    """uint16 bit patterns of F16/BF16 values in ``buf`` (uint64, reused between tensors
    to spare the kernel zeroing fresh pages): random sign and mantissa, |x| in [a, 4a)
    with ``a`` about 1/(2 sqrt(fan-in))."""
    shift, bias, mask = BITS[dtype]
    n = math.prod(shape)
    words = buf[: (n + 3) // 4]
    random_words(pool, seed, index, words)
    bits = words.view(np.uint16)[:n].reshape(shape)
    exp = bias + math.floor(math.log2(1.0 / math.sqrt(shape[-1]))) - 1
    exp -= exp % 2  # the random bit is the exponent's lowest
    np.bitwise_and(bits, mask, out=bits)
    np.bitwise_or(bits, exp << shift, out=bits)
    return bits


def tensor_data(
    pool: Executor,
    seed: int,
    index: int,
    name: str,
    shape: tuple[int, ...],
    dtype: str,
    buf: np.ndarray,
) -> np.ndarray:
    if len(shape) == 1:
        return np.ones(shape, dtype=np.float32)
    if is_f32(name, shape):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
        return rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[-1]))
    bits = random_half(pool, seed, index, shape, dtype, buf)
    return bits.view(np.float16) if dtype == "f16" else bits


def add_metadata(w: object, arch: str, s: Shape, dtype: str, name: str) -> None:
    """Hyperparameters and tokenizer, through gguf-py's writer (``w``: a GGUFWriter)."""
    import gguf

    assert isinstance(w, gguf.GGUFWriter)
    w.add_name(name)
    w.add_file_type(FTYPE[dtype])
    w.add_vocab_size(s.n_vocab)
    w.add_context_length(CTX_TRAIN)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_dimension_count(s.head_dim)
    w.add_layer_norm_rms_eps(RMS_EPS)
    if s.n_expert:
        w.add_expert_count(s.n_expert)
        w.add_expert_used_count(s.n_expert_used)
        w.add_expert_feed_forward_length(s.n_ff)
        w.add_feed_forward_length(s.n_ff * s.n_expert_used)
    else:
        w.add_feed_forward_length(s.n_ff)
    tokens, scores, types = vocabulary(s.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def write_model(
    path: Path,
    arch: str,
    shape: Shape,
    *,
    dtype: str = "f16",
    seed: int = 0,
) -> int:
    """Write the model to ``path`` (atomically: a temporary beside it, then renamed);
    returns the file size in bytes."""
    import gguf

    half = gguf.GGMLQuantizationType.F16 if dtype == "f16" else gguf.GGMLQuantizationType.BF16
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        add_metadata(w, arch, shape, dtype, f"synthetic-{arch}-{n_params(arch, shape)}")
        names = list(tensor_shapes(arch, shape))
        for name, shp in names:
            f32 = is_f32(name, shp)
            w.add_tensor_info(
                name,
                shp,
                np.dtype(np.float32 if f32 else np.uint16),
                math.prod(shp) * (4 if f32 else 2),
                raw_dtype=gguf.GGMLQuantizationType.F32 if f32 else half,
            )
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        write_tensors(w, names, dtype, seed)
        assert w.fout is not None
        for f in w.fout:
            f.flush()
            os.fsync(f.fileno())
        w.close()
        tmp.replace(path)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


def write_tensors(
    w: object, names: list[tuple[str, tuple[int, ...]]], dtype: str, seed: int
) -> None:
    """Stream every tensor to the writer ``w`` (a GGUFWriter past its tensor infos),
    generating the next one (into the other of two buffers) while one is written."""
    words = max((math.prod(shp) + 3) // 4 for _, shp in names)
    bufs = [np.empty(words, dtype=np.uint64) for _ in range(2)]
    with (
        ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool,
        ThreadPoolExecutor(max_workers=1) as ahead,
    ):

        def make(i: int) -> Future[np.ndarray]:
            name, shp = names[i]
            return ahead.submit(tensor_data, pool, seed, i, name, shp, dtype, bufs[i % 2])

        nxt = make(0)
        for i in range(len(names)):
            data = nxt.result()
            if i + 1 < len(names):
                nxt = make(i + 1)
            w.write_tensor_data(data)  # type: ignore[attr-defined]


def build_shape(args: argparse.Namespace) -> Shape:
    s = PRESETS[(args.arch, args.params)]
    if args.layers:
        s = replace(s, n_layer=args.layers)
    if args.vocab:
        s = replace(s, n_vocab=args.vocab)
    if args.experts is not None:
        if not s.n_expert:
            raise SystemExit("--experts needs a mixture-of-experts --arch (qwen3moe)")
        if args.experts < 1:
            raise SystemExit("--experts must be at least 1")
        s = replace(s, n_expert=args.experts, n_expert_used=min(s.n_expert_used, args.experts))
    return s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--arch", choices=ARCHS, default="llama")
    ap.add_argument("--params", choices=PARAMS, default="1B", help="size preset (tiny: tests)")
    ap.add_argument(
        "--experts", type=int, help="number of experts (qwen3moe; changes the total size)"
    )
    ap.add_argument("--layers", type=int, help="override the preset's layer count")
    ap.add_argument("--vocab", type=int, help="override the vocabulary size")
    ap.add_argument("--dtype", choices=DTYPES, default="f16", help="weight type (default f16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", required=True, type=Path)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    shape = build_shape(args)
    log.info(
        "%s %s: %s, %.3f B parameters",
        args.arch,
        args.params,
        shape,
        n_params(args.arch, shape) / 1e9,
    )
    t0 = time.perf_counter()
    size = write_model(args.output, args.arch, shape, dtype=args.dtype, seed=args.seed)
    dt = time.perf_counter() - t0
    log.info(
        "wrote %s: %.1f MB in %.1f s (%.0f MB/s)", args.output, size / 1e6, dt, size / 1e6 / dt
    )


if __name__ == "__main__":
    main()
