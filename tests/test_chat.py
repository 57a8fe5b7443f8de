"""Chat datasets: rendering through llama.cpp's templates, checked against strings
written by hand from each template's definition (src/llama-chat.cpp), and the errors a
user's file or model can cause."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tinymodels import CHATML_JINJA, CHATML_TOKENS

from imatrix.chat import (
    read_conversations,
    render_conversations,
    resolve_template,
    write_chat_text,
)
from imatrix.errors import ImatrixError
from imatrix.llama_api import load_model, tokenize
from imatrix.llama_text import builtin_templates

#: two records: one with a system message, one short exchange with padded content
CONVERSATIONS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a hash table?"},
        {"role": "assistant", "content": "A map from keys to buckets."},
    ],
    [
        {"role": "user", "content": " Hello "},
        {"role": "assistant", "content": "Hi."},
    ],
]

#: chatml: "<|im_start|>" role "\n" content "<|im_end|>\n" per message, content as is
CHATML = [
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\nWhat is a hash table?<|im_end|>\n"
    "<|im_start|>assistant\nA map from keys to buckets.<|im_end|>\n",
    "<|im_start|>user\n Hello <|im_end|>\n<|im_start|>assistant\nHi.<|im_end|>\n",
]
#: llama2 (no system support): "[INST] " once, a system message as its text and "\n",
#: a user message then " [/INST]", an assistant message then "</s>"; a new turn after
#: an answer opens with "[INST] "
LLAMA2 = [
    "[INST] Be brief.\nWhat is a hash table? [/INST]A map from keys to buckets.</s>",
    "[INST]  Hello  [/INST]Hi.</s>",
]
#: gemma: the system message (trimmed) joins the first user turn, "assistant" is
#: "model", every content trimmed, "<start_of_turn>" role "\n" ... "<end_of_turn>\n"
GEMMA = [
    "<start_of_turn>user\nBe brief.\n\nWhat is a hash table?<end_of_turn>\n"
    "<start_of_turn>model\nA map from keys to buckets.<end_of_turn>\n",
    "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\nHi.<end_of_turn>\n",
]


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def chat_jsonl(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])


def test_builtin_names_come_from_llama_cpp() -> None:
    names = builtin_templates()
    assert {"chatml", "llama2", "gemma", "llama3"} <= set(names)
    assert list(names) == sorted(names)


@pytest.mark.parametrize(("name", "golden"), [("llama2", LLAMA2), ("gemma", GEMMA)])
def test_named_templates_render_as_defined(name: str, golden: list[str], chat_jsonl: Path) -> None:
    convs = read_conversations(chat_jsonl)
    assert render_conversations(convs, resolve_template("unused.gguf", name, "c")) == golden


def test_model_template_from_metadata_renders_chatml(chat_model: Path, chat_jsonl: Path) -> None:
    tmpl = resolve_template(chat_model, None, "c")
    assert tmpl == CHATML_JINJA  # the model's own Jinja text, recognised by llama.cpp
    assert render_conversations(read_conversations(chat_jsonl), tmpl) == CHATML


def test_written_text_concatenates_records_and_parses_turn_markers(
    chat_model: Path, chat_jsonl: Path, tmp_path: Path
) -> None:
    out = write_chat_text(chat_model, chat_jsonl, tmp_path / "c.txt", template=None, dataset="c")
    text = out.read_text(encoding="utf-8")
    assert text == "".join(CHATML)
    with load_model(chat_model, vocab_only=True) as m:
        toks = tokenize(m, text, add_special=True, parse_special=True).tolist()
        start, end = (tokenize(m, t, add_special=False, parse_special=True) for t in CHATML_TOKENS)
    assert start.size == 1 and end.size == 1  # each marker is one control token
    assert toks.count(int(start[0])) == 5 and toks.count(int(end[0])) == 5


def test_parquet_records_render_like_jsonl(tmp_path: Path, chat_jsonl: Path) -> None:
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"id": [1, 2], "messages": CONVERSATIONS}), path)
    assert read_conversations(path) == read_conversations(chat_jsonl)
    # the start-up check reads the first record only
    assert read_conversations(path, limit=1) == read_conversations(chat_jsonl, limit=1)
    assert len(read_conversations(path, limit=1)) == 1
    out = write_chat_text("unused.gguf", path, tmp_path / "p.txt", template="gemma", dataset="p")
    assert out.read_text(encoding="utf-8") == "".join(GEMMA)


BAD_RECORDS = {
    "no messages field": ({"text": "hi"}, "chat.jsonl:1: record has no field 'messages'"),
    "messages not a list": ({"messages": "hi"}, "chat.jsonl:1: 'messages' is not a non-empty"),
    "empty conversation": ({"messages": []}, "chat.jsonl:1: 'messages' is not a non-empty"),
    "message without role": (
        {"messages": [{"content": "hi"}]},
        "chat.jsonl:1: message 0 is not a {role, content} object",
    ),
    "content not a string": (
        {"messages": [{"role": "user", "content": 3}]},
        "chat.jsonl:1: message 0 is not a {role, content} object",
    ),
    "NUL in content": (
        {"messages": [{"role": "user", "content": "a\0b"}]},
        "chat.jsonl:1: message 0 contains a NUL character",
    ),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_malformed_records_are_refused(case: str, tmp_path: Path) -> None:
    record, needle = BAD_RECORDS[case]
    path = write_jsonl(tmp_path / "chat.jsonl", [record])
    with pytest.raises(ImatrixError) as err:
        write_chat_text("unused.gguf", path, tmp_path / "o.txt", template="chatml", dataset="c")
    assert str(err.value).startswith(f"{tmp_path}/{needle}"), err.value
    assert not (tmp_path / "o.txt").exists()


def test_parquet_without_messages_column(tmp_path: Path) -> None:
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"text": ["a"]}), path)
    with pytest.raises(ImatrixError, match=r"chat.parquet: no column 'messages' \(columns: text\)"):
        read_conversations(path)


def test_text_file_is_not_chat_data(tmp_path: Path) -> None:
    path = tmp_path / "chat.txt"
    path.write_text("hello\n")
    with pytest.raises(ImatrixError, match="a chat dataset is JSONL or Parquet"):
        read_conversations(path)


def test_model_without_template_names_dataset_and_choices(dense_model: Path) -> None:
    with pytest.raises(ImatrixError) as err:
        resolve_template(dense_model, None, "support")
    msg = str(err.value)
    assert msg.startswith("dataset 'support': ") and "has no chat template" in msg
    assert "datasets.support.template" in msg and ", ".join(builtin_templates()) in msg


def test_unknown_model_template_and_unknown_name(tmp_path: Path) -> None:
    from tinymodels import write_tiny_model

    model = write_tiny_model(tmp_path / "odd.gguf", chat_template="{{ messages | tojson }}")
    with pytest.raises(ImatrixError, match=r"has a chat template llama\.cpp does not know; set"):
        resolve_template(model, None, "odd")
    with pytest.raises(ImatrixError, match=r"^datasets.odd.template: unknown chat template 'x' "):
        resolve_template(model, "x", "odd")
