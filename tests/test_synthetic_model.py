"""benchmarks/synthetic_model.py: random-weight models of real shape that llama.cpp runs.

The benchmarks measure speed and memory on these models, so what matters is that
llama.cpp loads them as the architecture they claim (every tensor present, real
vocabulary size), runs them to finite logits, and that the same arguments give the
same file. Tests write the "tiny" preset (real vocabulary, small layers); the real-size
presets are checked by their parameter counts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from llamatools import llama_imatrix
from tinymodels import sample_text

ROOT = Path(__file__).resolve().parents[1]


def _load_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "synthetic_model", ROOT / "benchmarks" / "synthetic_model.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["synthetic_model"] = mod
    spec.loader.exec_module(mod)
    return mod


sm = _load_module()

# (arch, dtype, vocabulary size, experts): both architectures, both weight types
CASES = [("llama", "f16", 32000, 0), ("qwen3moe", "bf16", 151936, 8)]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def synthetic(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, tuple[str, str, int, int]]:
    arch, dtype, _, _ = request.param
    out = tmp_path_factory.mktemp("synth") / f"{arch}.gguf"
    sm.main(["--arch", arch, "--params", "tiny", "--dtype", dtype, "--seed", "7", "-o", str(out)])
    return out, request.param


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_llama_cpp_loads_and_decodes(synthetic: tuple[Path, tuple[str, str, int, int]]) -> None:
    from imatrix.llama_api import Batch, Context, load_model, tokenize

    path, (arch, _, n_vocab, n_expert) = synthetic
    shape = sm.PRESETS[(arch, "tiny")]
    with load_model(path, n_gpu_layers=0) as m:
        assert m.meta("general.architecture") == arch
        assert m.meta(f"{arch}.expert_count") == (str(n_expert) if n_expert else None)
        assert (m.n_vocab, m.n_layer, m.n_embd) == (n_vocab, shape.n_layer, shape.n_embd)
        toks = tokenize(m, sample_text(60, seed=1), add_special=True, parse_special=False)
        # the generated pieces cover lowercase words: few byte fallbacks (ids 3..258)
        assert toks[0] == 1 and np.mean((toks >= 3) & (toks < 259)) < 0.2
        toks = toks[:64]
        with Context(m, n_ctx=128, n_batch=64, n_threads=2) as ctx:
            ctx.decode_tokens(Batch(64), toks, np.arange(toks.size), 0, True)
            logits = ctx.logits(toks.size)
            assert np.isfinite(logits).all() and logits.std() > 0


def test_llama_imatrix_runs_a_chunk(
    synthetic: tuple[Path, tuple[str, str, int, int]], llama_bin: Path, tmp_path: Path
) -> None:
    path, (_, _, _, n_expert) = synthetic
    text = tmp_path / "t.txt"
    text.write_text(sample_text(400, seed=2), encoding="utf-8")
    out = tmp_path / "ref.gguf"
    llama_imatrix(llama_bin, "-m", path, "-f", text, "-o", out, "-c", 128, "--chunks", 1, "-t", 2)
    from imatrix.formats import read_imatrix

    data = read_imatrix(out)
    assert "blk.0.attn_q.weight" in data.entries
    if n_expert:
        assert data.entries["blk.0.ffn_up_exps.weight"].n_counts == n_expert


def test_same_arguments_same_bytes(
    synthetic: tuple[Path, tuple[str, str, int, int]], tmp_path: Path
) -> None:
    path, (arch, dtype, _, _) = synthetic
    args = ["--arch", arch, "--params", "tiny", "--dtype", dtype]
    sm.main([*args, "--seed", "7", "-o", str(tmp_path / "again.gguf")])
    assert _sha256(tmp_path / "again.gguf") == _sha256(path)
    sm.main([*args, "--seed", "8", "-o", str(tmp_path / "other.gguf")])
    assert _sha256(tmp_path / "other.gguf") != _sha256(path)
    assert not list(tmp_path.glob(".*.tmp"))  # no temporaries left behind


def test_weights_are_finite_and_scaled(synthetic: tuple[Path, tuple[str, str, int, int]]) -> None:
    import gguf

    path, (_, dtype, _, _) = synthetic
    r = gguf.GGUFReader(str(path))
    t = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    bits = np.asarray(t.data).view(np.uint16).ravel()
    vals = (
        bits.view(np.float16).astype(np.float64)
        if dtype == "f16"
        else (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    )
    fan_in = int(t.shape[0])  # gguf order: ne0 is the row length
    a = np.abs(vals)
    assert np.isfinite(vals).all()
    # magnitudes within two octaves around 1/sqrt(fan-in), both signs, many values
    assert a.min() >= 0.1 / np.sqrt(fan_in) and a.max() <= 2.0 / np.sqrt(fan_in)
    assert 0.4 < np.mean(vals > 0) < 0.6
    # nearly every bit pattern the mask leaves random occurs (random, not constant data)
    patterns = 2 ** bin(sm.BITS[dtype][2]).count("1")
    assert np.unique(bits).size >= 0.9 * min(bits.size, patterns)


@pytest.mark.parametrize(
    "arch,params,lo,hi",
    [
        ("llama", "1B", 0.9e9, 1.3e9),
        ("llama", "7B", 6.0e9, 7.5e9),
        ("qwen3moe", "1B", 0.9e9, 1.3e9),
        ("qwen3moe", "7B", 6.0e9, 7.5e9),
    ],
)
def test_presets_have_their_size(arch: str, params: str, lo: float, hi: float) -> None:
    assert lo <= sm.n_params(arch, sm.PRESETS[(arch, params)]) <= hi


def test_experts_override(tmp_path: Path) -> None:
    args = sm.parse_args(["--arch", "qwen3moe", "--params", "1B", "--experts", "128", "-o", "x"])
    s = sm.build_shape(args)
    assert (s.n_expert, s.n_expert_used) == (128, 8)
    with pytest.raises(SystemExit):
        sm.build_shape(sm.parse_args(["--arch", "llama", "--experts", "4", "-o", "x"]))


def test_vocabulary_is_unique_and_exact() -> None:
    for n in (32000, 151936):
        tokens, scores, types = sm.vocabulary(n)
        assert len(tokens) == len(set(tokens)) == len(scores) == len(types) == n
