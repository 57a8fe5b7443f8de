"""Chat datasets: conversations rendered with the model's chat template into one text.

Why: a chat model spends its life inside its template (turn markers, role names,
special tokens); calibrating it on plain prose leaves the activations those tokens
cause out of the imatrix. A ``chat`` dataset is JSONL or Parquet with a ``messages``
column, each record one conversation (a list of ``{role, content}``).

Rendering (:func:`render_conversations`): each record separately through llama.cpp's
``llama_chat_apply_template`` (:mod:`imatrix.llama_text`), with no assistant-generation
prompt at the end (calibration text is finished conversations, not a prompt waiting for
an answer), and the rendered records concatenated with nothing between them: every
template already ends a turn with its own marker, so the stream reads as consecutive
conversations do in a llama.cpp session. The text is tokenized with special tokens
parsed (turn markers become their control tokens); the tokenizer adds the model's BOS
once at the start of the stream, as for every dataset.

The template: the one named by the dataset's ``template:`` (one of llama.cpp's built-in
names), else the GGUF's ``tokenizer.chat_template`` when llama.cpp recognises it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imatrix.atomic import atomic_write
from imatrix.errors import ImatrixError
from imatrix.llama_text import apply_template, builtin_templates, model_template, template_known
from imatrix.records import FORMAT_BY_SUFFIX, jsonl_values, parquet_values

log = logging.getLogger(__name__)

#: the field (JSONL) or column (Parquet) holding a record's conversation
MESSAGES_COLUMN = "messages"
#: what joins two rendered conversations (see the module docstring)
CONVERSATION_SEPARATOR = ""

Conversation = list[tuple[str, str]]


def check_template_name(name: str, dataset: str) -> str:
    """``name`` if it is one of llama.cpp's built-in templates, else an error naming the
    dataset and the valid names."""
    if name not in builtin_templates():
        raise ImatrixError(
            f"datasets.{dataset}.template: unknown chat template '{name}' "
            f"(llama.cpp's built-in templates: {', '.join(builtin_templates())})"
        )
    return name


def resolve_template(model_path: str | Path, name: str | None, dataset: str) -> str:
    """The template to render dataset ``dataset`` with: ``name`` (a built-in name), else
    the model's own template if llama.cpp recognises it."""
    if name is not None:
        return check_template_name(name, dataset)
    from imatrix.llama_api import load_model

    with load_model(model_path, vocab_only=True) as m:
        tmpl = model_template(m)
    if tmpl is None or not template_known(tmpl):
        why = (
            "has no chat template"
            if tmpl is None
            else "has a chat template llama.cpp does not know"
        )
        raise ImatrixError(
            f"dataset '{dataset}': {model_path} {why}; set datasets.{dataset}.template to one "
            f"of llama.cpp's built-in templates: {', '.join(builtin_templates())}"
        )
    return tmpl


def conversation(value: Any, where: str) -> Conversation:
    """A record's ``messages`` value as (role, content) pairs, or an error naming
    ``where`` (file and line or row)."""
    if not isinstance(value, list) or not value:
        raise ImatrixError(
            f"{where}: '{MESSAGES_COLUMN}' is not a non-empty list of {{role, content}} objects"
        )
    out: Conversation = []
    for k, msg in enumerate(value):
        role = msg.get("role") if isinstance(msg, dict) else None
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise ImatrixError(
                f"{where}: message {k} is not a {{role, content}} object with string values"
            )
        if "\0" in role or "\0" in content:
            raise ImatrixError(f"{where}: message {k} contains a NUL character")
        out.append((role, content))
    return out


def read_conversations(path: str | Path, limit: int | None = None) -> list[Conversation]:
    """Every record's conversation (the first ``limit`` only, if given), in file order;
    JSONL or Parquet, by extension."""
    p = Path(path)
    kind = FORMAT_BY_SUFFIX.get(p.suffix.lower())
    if kind is None:
        raise ImatrixError(
            f"{p}: a chat dataset is JSONL or Parquet ({', '.join(FORMAT_BY_SUFFIX)})"
        )
    try:
        records = _parquet_messages(p, limit) if kind == "parquet" else _jsonl_messages(p, limit)
    except UnicodeDecodeError as exc:
        raise ImatrixError(f"{p}: not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise ImatrixError(f"{p}: cannot read: {exc.strerror or exc}") from exc
    if not records:
        raise ImatrixError(f"{p}: no records")
    return [conversation(v, where) for where, v in records]


def _jsonl_messages(path: Path, limit: int | None) -> list[tuple[str, Any]]:
    return [(f"{path}:{i}", v) for i, v in jsonl_values(path, MESSAGES_COLUMN, limit)]


def _parquet_messages(path: Path, limit: int | None) -> list[tuple[str, Any]]:
    values = parquet_values(path, MESSAGES_COLUMN, limit)
    return [(f"{path}: row {i}", v) for i, v in enumerate(values)]


def check_chat_dataset(
    path: str | Path, template: str | None, models: list[str], dataset: str
) -> None:
    """The start-up check of a chat dataset: its first record is a conversation, and the
    template is a built-in name or else each model's own is one llama.cpp knows."""
    read_conversations(path, limit=1)
    if template is not None:
        check_template_name(template, dataset)
    for model in models:
        resolve_template(model, None, dataset)


def render_conversations(conversations: Sequence[Conversation], template: str) -> list[str]:
    """Each conversation rendered with ``template``, one string per record."""
    out = []
    for conv in conversations:
        text = apply_template(template, conv)
        if text is None:
            raise ImatrixError(f"llama.cpp does not know the chat template '{template[:40]}'")
        out.append(text)
    return out


def write_chat_text(
    model: str | Path,
    data: str | Path,
    output: str | Path,
    *,
    template: str | None,
    dataset: str,
) -> Path:
    """Render chat dataset ``data`` into a UTF-8 text file (atomically) for the
    tokenizer, with ``template`` or the model's own."""
    convs = read_conversations(data)
    tmpl = resolve_template(model, template, dataset)
    text = CONVERSATION_SEPARATOR.join(render_conversations(convs, tmpl))
    atomic_write(output, text.encode("utf-8"))
    log.info("%s: %d conversations, %d characters -> %s", data, len(convs), len(text), output)
    return Path(output)
