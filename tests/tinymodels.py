"""Tiny llama-architecture GGUF models for tests, generated with gguf-py.

Why generated instead of shipped: they are deterministic from a seed, cost nothing in
the repository, and let tests choose shapes (row sizes that are multiples of 256 so
that every k- and i-quant applies without fallbacks; a mixture-of-experts variant
with 4 experts, 2 used). llama.cpp's own tools load them like any model.

Also a command: ``python tests/tinymodels.py OUT.gguf [--moe] [--seed N]``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# A small SentencePiece-style vocabulary: control tokens, the 256 byte fallbacks,
# then letters and frequent English words, so that ordinary text tokenizes to a
# realistic mix of pieces and bytes.
_WORDS = (
    "the of and to in is was for that with as on by at from his her it an are be this "
    "which or had not but were have their they one all there been has when who more "
    "would its into some time than other them these so can out only first new after "
    "also over about two may such then up like most man made could many people years "
    "world house water light night day old long great little good small said see way"
).split()
_LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [
    chr(c) for c in range(ord("A"), ord("Z") + 1)
]
_PUNCT = list(".,;:!?'\"-()0123456789")

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_BYTE = 1, 2, 3, 6


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"]
    types = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TOKEN_BYTE] * 256
    pieces = ["▁"] + ["▁" + w for w in _WORDS] + _WORDS + _LETTERS + ["▁" + c for c in _LETTERS]
    pieces += _PUNCT
    seen = set(tokens)
    for p in pieces:
        if p not in seen:
            seen.add(p)
            tokens.append(p)
            types.append(TOKEN_NORMAL)
    # longer pieces score higher so SPM prefers whole words
    scores = [0.0] * 259 + [float(len(t)) - 10.0 for t in tokens[259:]]
    return tokens, scores, types


@dataclass(frozen=True)
class TinySpec:
    n_embd: int = 256
    n_ff: int = 512
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ctx_train: int = 2048
    n_expert: int = 0
    n_expert_used: int = 0
    #: store 2-D weight matrices as F16 (like a real base model) instead of F32
    f16: bool = True


DENSE = TinySpec()
MOE = TinySpec(n_expert=4, n_expert_used=2)


#: the chatml template as models ship it (Jinja; llama.cpp recognises it by ``<|im_start|>``)
CHATML_JINJA = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
#: the control tokens chatml needs, added to the vocabulary of the chat model
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def write_tiny_model(
    path: str | Path,
    spec: TinySpec = DENSE,
    seed: int = 0,
    nan_weights: bool = False,
    chat_template: str | None = None,
    control_tokens: tuple[str, ...] = (),
    tied: bool = False,
) -> Path:
    """Write a tiny llama GGUF to ``path`` and return the path.

    ``nan_weights`` plants NaNs in one FFN weight, for tests of non-finite activations.
    ``chat_template`` is stored as ``tokenizer.chat_template``; ``control_tokens`` are
    appended to the vocabulary as control tokens (e.g. a template's turn markers).
    ``tied``: no ``output.weight``; the output projection uses the token embedding.
    """
    import gguf  # imported here: only tests and fixtures need gguf-py's writer

    rng = np.random.default_rng(seed)
    tokens, scores, types = vocabulary()
    tokens += control_tokens
    scores += [0.0] * len(control_tokens)
    types += [TOKEN_CONTROL] * len(control_tokens)
    n_vocab = len(tokens)
    path = Path(path)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"tiny-llama-{'moe' if spec.n_expert else 'dense'}-{seed}")
    w.add_vocab_size(n_vocab)
    w.add_context_length(spec.n_ctx_train)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_rope_dimension_count(spec.n_embd // spec.n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(1 if spec.f16 else 0)
    if spec.n_expert:
        w.add_expert_count(spec.n_expert)
        w.add_expert_used_count(spec.n_expert_used)
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
    if chat_template is not None:
        w.add_chat_template(chat_template)

    mat_dtype = np.float16 if spec.f16 else np.float32

    def mat(*shape: int, scale: float | None = None) -> np.ndarray:
        fan_in = shape[-1]
        s = scale if scale is not None else 1.0 / np.sqrt(fan_in)
        return (rng.standard_normal(shape) * s).astype(mat_dtype)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    e, f, hd = spec.n_embd, spec.n_ff, spec.n_embd // spec.n_head
    kv = spec.n_head_kv * hd
    w.add_tensor("token_embd.weight", mat(n_vocab, e, scale=1.0))
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm(e))
        w.add_tensor(p + "attn_q.weight", mat(e, e))
        w.add_tensor(p + "attn_k.weight", mat(kv, e))
        w.add_tensor(p + "attn_v.weight", mat(kv, e))
        w.add_tensor(p + "attn_output.weight", mat(e, e))
        w.add_tensor(p + "ffn_norm.weight", norm(e))
        if spec.n_expert:
            w.add_tensor(p + "ffn_gate_inp.weight", mat(spec.n_expert, e).astype(np.float32))
            w.add_tensor(p + "ffn_gate_exps.weight", mat(spec.n_expert, f, e))
            w.add_tensor(p + "ffn_up_exps.weight", mat(spec.n_expert, f, e))
            w.add_tensor(p + "ffn_down_exps.weight", mat(spec.n_expert, e, f))
        else:
            gate = mat(f, e)
            if nan_weights and i == spec.n_layer - 1:
                gate[0, :] = np.nan
            w.add_tensor(p + "ffn_gate.weight", gate)
            w.add_tensor(p + "ffn_up.weight", mat(f, e))
            w.add_tensor(p + "ffn_down.weight", mat(e, f))
    w.add_tensor("output_norm.weight", norm(e))
    if not tied:  # else llama.cpp projects onto the token embedding
        w.add_tensor("output.weight", mat(n_vocab, e))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


#: A few hundred words of plain English (original text) for calibration in tests.
SAMPLE_TEXT = """\
The old house stood at the end of the long road, where the water of the river met the
light of the morning. Many people had lived there over the years, and each of them had
left something behind: a chair by the window, a small garden of herbs, a map of the
world with two cities circled in red. In the first days of spring the children of the
village would come to see the house, for they said that at night a light moved from
room to room, and that a man who had made a great fortune at sea still walked its halls.
Nobody could say who he was, or when he had come, or why he would not leave. The
grandmother of the baker said that she had seen him once, long ago, standing in the
garden with his hands in the earth, planting something that never grew.
"""


def sample_text(n_words: int, seed: int = 0) -> str:
    """Deterministic pseudo-English of about ``n_words`` words, from the sample's words."""
    rng = np.random.default_rng(seed)
    words = SAMPLE_TEXT.split()
    out = []
    i = 0
    while len(out) < n_words:
        j = int(rng.integers(0, len(words) - 12))
        span = int(rng.integers(4, 12))
        out.extend(words[j : j + span])
        i += 1
        if i % 7 == 0:
            out[-1] = out[-1].rstrip(".,") + ".\n"
    return " ".join(out[:n_words]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("output")
    ap.add_argument("--moe", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    write_tiny_model(args.output, MOE if args.moe else DENSE, seed=args.seed)


if __name__ == "__main__":
    main()
