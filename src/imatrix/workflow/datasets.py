"""Calibration datasets (text, JSONL or Parquet files) as the one text the tokenizer reads."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from imatrix.atomic import atomic_write
from imatrix.errors import ImatrixError

log = logging.getLogger(__name__)

#: How records of a JSONL or Parquet dataset are joined into one text.
RECORD_SEPARATOR = "\n\n"

#: What separates the documents of a text file (``boundary: document``): a blank line,
#: which may hold whitespace.
PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")

#: Dataset format by file extension (``format: auto``); anything else is text.
FORMAT_BY_SUFFIX = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def dataset_format(path: str, fmt: str = "auto") -> str:
    """``text``, ``jsonl`` or ``parquet``: as configured, or by the file's extension."""
    if fmt != "auto":
        return fmt
    return FORMAT_BY_SUFFIX.get(Path(path).suffix.lower(), "text")


def _read_utf8(path: Path, what: str) -> str:
    """The file's text; ``what`` names what it should have been in the error."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ImatrixError(f"{path}: not {what} ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise ImatrixError(f"{path}: cannot read: {exc.strerror or exc}") from exc


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
        return _read_utf8(p, "UTF-8 text")
    records = (
        _jsonl_records(p, text_column) if kind == "jsonl" else _parquet_records(p, text_column)
    )
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
        docs = [d.strip("\n") for d in PARAGRAPH_BREAK.split(_read_utf8(p, "UTF-8 text"))]
    else:
        docs = (
            _jsonl_records(p, text_column) if kind == "jsonl" else _parquet_records(p, text_column)
        )
    return [d for d in docs if d.strip()]


def _jsonl_records(path: Path, column: str) -> list[str]:
    out: list[str] = []
    for i, line in enumerate(_read_utf8(path, "UTF-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ImatrixError(f"{path}:{i}: not a JSON object: {exc.msg}") from exc
        if not isinstance(rec, dict) or column not in rec:
            raise ImatrixError(f"{path}:{i}: record has no field '{column}'")
        if not isinstance(rec[column], str):
            raise ImatrixError(f"{path}:{i}: field '{column}' is not a string")
        out.append(rec[column])
    return out


def _parquet_records(path: Path, column: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ImatrixError(f"{path}: not a Parquet file: {exc}") from exc
    if column not in schema.names:
        raise ImatrixError(f"{path}: no column '{column}' (columns: {', '.join(schema.names)})")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ImatrixError(f"{path}: column '{column}' is {kind}, not text")
    values: list[str | None] = pq.read_table(path, columns=[column]).column(column).to_pylist()
    if any(v is None for v in values):
        raise ImatrixError(f"{path}: column '{column}' has null values")
    return [v for v in values if v is not None]


def write_dataset_text(
    path: str | Path, output: str | Path, *, fmt: str = "auto", text_column: str = "text"
) -> Path:
    """Extract a dataset's text into a UTF-8 file (atomically), for the tokenizer."""
    text = load_dataset_text(path, fmt, text_column)
    atomic_write(output, text.encode("utf-8"))
    log.info("%s: %d characters of text from %s", output, len(text), path)
    return Path(output)
