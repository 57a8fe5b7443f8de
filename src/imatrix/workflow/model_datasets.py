"""Datasets whose text depends on the model: ``format: chat`` and ``generate:``.

Why their own paths: a chat dataset is rendered with the model's chat template and a
generated one is written by the model itself, so their text is per model,
``results/{m}/datasets/{d}.txt`` (a generated dataset's JSONL first goes to
``results/{m}/generated/{d}.jsonl``), where a plain dataset's is shared by all models
(``results/datasets/{d}.txt``). Chat text is tokenized with special tokens parsed: its
turn markers are control tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imatrix.errors import ImatrixError

#: where a model's rendering of a chat or generated dataset goes
MODEL_TEXT = "results/{m}/datasets/{d}.txt"
#: where a generated dataset's records go
GENERATED = "results/{m}/generated/{d}.jsonl"


def is_chat(ds: Mapping[str, Any]) -> bool:
    return ds.get("format") == "chat"


def is_model_bound(ds: Mapping[str, Any]) -> bool:
    """Whether the dataset's text depends on the model (chat or generated)."""
    return "generate" in ds or is_chat(ds)


def model_text_path(m: str, d: str) -> str:
    return MODEL_TEXT.format(m=m, d=d)


def generated_path(m: str, d: str) -> str:
    return GENERATED.format(m=m, d=d)


def parse_special(ds: Mapping[str, Any], default: bool) -> bool:
    """Whether the dataset's text is tokenized with special tokens parsed: always for
    chat, else the ``collect.parse_special`` setting."""
    return True if is_chat(ds) else bool(default)


def check_model_datasets(
    datasets: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
    *,
    check_chat: bool = True,
) -> None:
    """Start-up checks the schema cannot make: prompts files exist, ``template:`` and
    ``generate:`` only where they mean something, and (with ``check_chat``) a chat
    dataset's first record and template are usable (:func:`imatrix.chat.check_chat_dataset`;
    the model's own template only for models given by path, and only where llama_cpp can
    be imported: Snakemake's own environment may lack it, and the job checks again)."""
    for name, ds in datasets.items():
        if "generate" in ds:
            if "path" in ds:
                raise ImatrixError(f"datasets.{name}: give either path or generate, not both")
            prompts = Path(ds["generate"]["prompts"])
            if not prompts.is_file():
                raise ImatrixError(f"datasets.{name}.generate.prompts: {prompts}: no such file")
        if "template" in ds and not is_chat(ds):
            raise ImatrixError(f"datasets.{name}.template: only for format: chat")
        if is_chat(ds) and "generate" in ds:
            raise ImatrixError(f"datasets.{name}: a generated dataset is not chat data")
        if check_chat and is_chat(ds) and _have_llama_cpp():
            from imatrix.chat import check_chat_dataset

            template = ds.get("template")
            paths = [m["path"] for m in models.values() if "path" in m and template is None]
            check_chat_dataset(ds["path"], template, paths, name)


def _have_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def write_model_dataset_text(
    model: str, data: str, output: str, *, dataset: str, ds: Mapping[str, Any]
) -> Path:
    """The text of a chat dataset (rendered with the model's template) or a generated
    one (its records' ``text`` fields, as any JSONL dataset), for the tokenizer."""
    if is_chat(ds):
        from imatrix.chat import write_chat_text

        template = ds.get("template")
        return write_chat_text(model, data, output, template=template, dataset=dataset)
    from imatrix.generate import TEXT_FIELD
    from imatrix.workflow.datasets import write_dataset_text

    return write_dataset_text(data, output, fmt="jsonl", text_column=TEXT_FIELD)
