"""llama.cpp's text functions beyond tokenizing: chat templates and token pieces.

Why through llama.cpp and not a Jinja engine: ``llama_chat_apply_template`` is what
llama.cpp's own tools use to format a conversation, so calibration text rendered here
is what a llama.cpp user's model sees. It knows a fixed list of built-in templates
(``llama_chat_builtin_templates``) and recognises a GGUF's Jinja template only by
looking for marker strings in it (``llm_chat_detect_template`` in
src/llama-chat.cpp); it never evaluates Jinja.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imatrix.llama_api import Model

#: a conversation that every template renders (to ask llama.cpp whether it knows one)
_PROBE = (("user", "hello"),)


@functools.lru_cache(maxsize=1)
def builtin_templates() -> tuple[str, ...]:
    """Names of llama.cpp's built-in chat templates, in its (alphabetical) order."""
    import llama_cpp

    n = int(llama_cpp.llama_chat_builtin_templates(None, 0))
    names = (ctypes.c_char_p * n)()
    llama_cpp.llama_chat_builtin_templates(names, n)
    return tuple((v or b"").decode() for v in names)


def model_template(model: Model) -> str | None:
    """The model's ``tokenizer.chat_template`` (Jinja text), or None without one."""
    import llama_cpp

    raw = llama_cpp.llama_model_chat_template(model.ptr, None)
    return None if raw is None else bytes(raw).decode("utf-8", errors="replace")


def apply_template(template: str, messages: Sequence[tuple[str, str]]) -> str | None:
    """``messages`` ((role, content) pairs) rendered with ``template`` (a built-in name
    or a Jinja text llama.cpp recognises), without an assistant-generation prompt;
    None when llama.cpp does not know the template."""
    import llama_cpp

    arr = (llama_cpp.llama_chat_message * len(messages))()
    keep = []  # the encoded strings must outlive the call
    for i, (role, content) in enumerate(messages):
        r, c = role.encode("utf-8"), content.encode("utf-8")
        keep += [r, c]
        arr[i].role, arr[i].content = r, c
    tmpl = template.encode("utf-8")
    size = 2 * sum(len(s) for s in keep) + 256
    for _ in range(2):  # llama.cpp returns the size it needs when the buffer is too small
        buf = ctypes.create_string_buffer(size + 1)
        n = int(llama_cpp.llama_chat_apply_template(tmpl, arr, len(messages), False, buf, size))
        if n < 0:
            return None
        if n <= size:
            return buf.raw[:n].decode("utf-8")
        size = n
    raise AssertionError("llama_chat_apply_template asked for a larger buffer twice")


def template_known(template: str) -> bool:
    """Whether llama.cpp recognises ``template`` (a name or a Jinja text)."""
    return apply_template(template, _PROBE) is not None


def token_piece(model: Model, token: int) -> bytes:
    """The bytes a token stands for (``llama_token_to_piece``; control tokens render as
    nothing, as in llama.cpp's generated text)."""
    import llama_cpp

    buf = ctypes.create_string_buffer(64)
    n = int(llama_cpp.llama_token_to_piece(model.vocab, token, buf, len(buf), 0, False))
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = int(llama_cpp.llama_token_to_piece(model.vocab, token, buf, -n, 0, False))
    return buf.raw[: max(n, 0)]


def is_end_of_generation(model: Model, token: int) -> bool:
    """Whether the model ends its text with this token (EOS, EOT, ...)."""
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(model.vocab, token))


def end_of_generation_tokens(model: Model) -> list[int]:
    """Every token id the model ends its text with (to mask them out)."""
    import llama_cpp

    vocab = model.vocab
    return [t for t in range(model.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]
