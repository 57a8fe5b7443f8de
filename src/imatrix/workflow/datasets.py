"""Calibration datasets (text, JSONL or Parquet files) as the one text the tokenizer reads."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from imatrix.atomic import atomic_write
from imatrix.errors import ImatrixError
from imatrix.records import FORMAT_BY_SUFFIX, jsonl_records, parquet_records, read_utf8

log = logging.getLogger(__name__)

#: How records of a JSONL or Parquet dataset are joined into one text.
RECORD_SEPARATOR = "\n\n"

#: What separates the documents of a text file (``boundary: document``): a blank line,
#: which may hold whitespace.
PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")


def dataset_format(path: str, fmt: str = "auto") -> str:
    """``text``, ``jsonl`` or ``parquet``: as configured, or by the file's extension."""
    if fmt != "auto":
        return fmt
    return FORMAT_BY_SUFFIX.get(Path(path).suffix.lower(), "text")


def load_dataset_text(path: str | Path, fmt: str = "auto", text_column: str = "text") -> str:
    """The calibration text of a dataset file.

    Text files are read as UTF-8 as they are. JSONL and Parquet records are taken in
    file order, their ``text_column`` joined with a blank line: llama-imatrix calibrates
    on one stream of text, and a paragraph break is the most neutral seam between
    documents.
    """
    p = Path(path)
    kind = dataset_format(str(p), fmt)
    if kind == "text":
        return read_utf8(p, "UTF-8 text")
    records = jsonl_records(p, text_column) if kind == "jsonl" else parquet_records(p, text_column)
    if not records:
        raise ImatrixError(f"{p}: no records")
    return RECORD_SEPARATOR.join(records)


def load_documents(path: str | Path, fmt: str = "auto", text_column: str = "text") -> list[str]:
    """The documents of a dataset file, in file order: its records (JSONL, Parquet), or
    the paragraphs of a text file (split at blank lines); documents holding only
    whitespace are dropped, as they have no start to begin a chunk at."""
    p = Path(path)
    kind = dataset_format(str(p), fmt)
    if kind == "text":
        docs = [d.strip("\n") for d in PARAGRAPH_BREAK.split(read_utf8(p, "UTF-8 text"))]
    else:
        docs = jsonl_records(p, text_column) if kind == "jsonl" else parquet_records(p, text_column)
    return [d for d in docs if d.strip()]


def write_dataset_text(
    path: str | Path, output: str | Path, *, fmt: str = "auto", text_column: str = "text"
) -> Path:
    """Extract a dataset's text into a UTF-8 file (atomically), for the tokenizer."""
    text = load_dataset_text(path, fmt, text_column)
    atomic_write(output, text.encode("utf-8"))
    log.info("%s: %d characters of text from %s", output, len(text), path)
    return Path(output)
