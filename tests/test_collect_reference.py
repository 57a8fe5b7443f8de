"""in_sum2, in_sum and counts of every tensor against an independent numpy reference.

The reference runs the same decodes a second time through a plain eval callback that
copies out the input of every matrix multiplication (and the expert ids of every
``MUL_MAT_ID``) and sums them with float64 numpy: none of the collector's code
(node selection, graph cut, shared-input reuse, float32 groups, expert routing) is
involved. Models: a 6-layer dense and a 4-layer MoE tiny model, so that every layer
is checked, experts and router included, down to the deepest (whose input has gone
through every earlier layer). The tolerance is the bound stated in
:mod:`imatrix.activations` (plus the reference's own float64 rounding).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from tinymodels import DENSE, MOE, write_tiny_model

from imatrix import ggml
from imatrix.collect import CollectSettings, collect
from imatrix.llama_api import Batch, Context, load_model
from imatrix.tokenize import tokenize_file

N_CTX = 128
CHUNKS = 4
#: relative error bound of our sums (17 float32 ulps + float64 terms, rounded up)
REL = 2e-6


class Capture:
    """Eval callback: float64 copies of every blk.* matmul input, per weight."""

    def __init__(self) -> None:
        layout = ggml.check_layout()
        self.mm, self.mmid = layout.op_mul_mat, layout.op_mul_mat_id
        #: name -> list of (rows [n, ne0] or [tokens, ne11, ne0], expert ids or None)
        self.seen: dict[str, list[tuple[np.ndarray, np.ndarray | None]]] = {}

    def __call__(self, addr: int, ask: bool) -> bool:
        t = ggml.tensor(addr)
        if ask:
            return t.op in (self.mm, self.mmid)
        name = ggml.filter_name(ggml.tensor(t.src[0]).name)
        if name.startswith("blk."):
            src1 = ggml.tensor(t.src[1])
            x = ggml.host_array(src1, np.dtype(np.float32)).astype(np.float64)
            if t.op == self.mmid:
                ids = ggml.host_array(ggml.tensor(t.src[2]), np.dtype(np.int32))[0, 0].copy()
                self.seen.setdefault(name, []).append((x[0], ids))
            else:
                self.seen.setdefault(name, []).append((x.reshape(-1, x.shape[-1]), None))
        return True


def reference(model: Path, tokens: np.ndarray) -> dict[str, tuple[np.ndarray, ...]]:
    """(sum of squares [n_mat, ne0], sum, sum of |x|, counts) per weight, float64."""
    cap = Capture()
    with load_model(model, n_gpu_layers=0) as m:
        bos = m.bos if m.add_bos else None
        with Context(m, n_ctx=N_CTX, n_batch=N_CTX, n_seq_max=1, n_threads=1, cb_eval=cap) as ctx:
            batch = Batch(N_CTX)
            for k in range(CHUNKS):
                chunk = tokens[k * N_CTX : (k + 1) * N_CTX].copy()
                if bos is not None:
                    chunk[0] = bos
                ctx.clear()
                ctx.decode_tokens(batch, chunk, np.arange(N_CTX, dtype=np.int32), 0, True)
    out = {}
    for name, parts in cap.seen.items():
        if parts[0][1] is None:
            rows = np.concatenate([x for x, _ in parts])
            out[name] = (
                (rows * rows).sum(0)[None],
                rows.sum(0)[None],
                np.abs(rows).sum(0)[None],
                np.array([rows.shape[0]]),
            )
        else:
            out[name] = _per_expert(parts)
    return out


def _per_expert(parts: list[tuple[np.ndarray, np.ndarray | None]]) -> tuple[np.ndarray, ...]:
    n_exp = 4
    ne0 = parts[0][0].shape[-1]
    sq, s, a = (np.zeros((n_exp, ne0)) for _ in range(3))
    counts = np.zeros(n_exp, dtype=np.int64)
    for x, ids in parts:
        assert ids is not None
        for slot in range(ids.shape[1]):
            rows = x[:, slot % x.shape[1]]
            for e in range(n_exp):
                sel = rows[ids[:, slot] == e]
                sq[e] += (sel * sel).sum(0)
                s[e] += sel.sum(0)
                a[e] += np.abs(sel).sum(0)
                counts[e] += sel.shape[0]
    return sq, s, a, counts


@pytest.fixture(scope="module", params=["dense-6-layers", "moe-4-layers"])
def deep_model(request, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("deep")
    if request.param.startswith("dense"):
        return write_tiny_model(d / "dense6.gguf", replace(DENSE, n_layer=6), seed=5)
    return write_tiny_model(d / "moe4.gguf", replace(MOE, n_layer=4), seed=6)


def test_every_tensor_matches_the_numpy_reference(deep_model, calib_text, tmp_path):
    toks = tmp_path / "t.npy"
    tokenize_file(deep_model, calib_text, toks)
    settings = CollectSettings(
        n_ctx=N_CTX, n_batch=N_CTX, last_chunk=CHUNKS, compute_ppl=False, threads=1
    )
    ours = collect(deep_model, toks, None, settings).data.entries
    ref = reference(deep_model, np.load(toks))
    assert sorted(ours) == sorted(ref)
    n_layer = 6 if "dense" in deep_model.name else 4
    assert any(n.startswith(f"blk.{n_layer - 1}.") for n in ours)  # the deepest layer
    if "moe" in deep_model.name:
        assert any("_exps" in n for n in ours) and any("ffn_gate_inp" in n for n in ours)
    for name, (sq, s, a, counts) in ref.items():
        e = ours[name]
        assert e.counts.tolist() == counts.tolist(), name
        n = int(counts.max())
        assert e.sums is not None
        vals, sums = e.values.reshape(sq.shape), e.sums.reshape(s.shape)
        assert np.all(np.abs(vals - sq) <= REL * sq + n * 2.0**-149), name
        assert np.all(np.abs(sums - s) <= REL * a), name
        assert np.any(vals > 0), name
