"""Records of dataset files: a UTF-8 text, a JSONL field, a Parquet column.

Why one module: calibration datasets (:mod:`imatrix.workflow.datasets`), chat datasets
(:mod:`imatrix.chat`) and ``generate``'s prompts read the same kinds of file and must
refuse a bad one with the same message, naming the file and the line or column; the
library modules import it without importing the workflow package.

A JSONL file is split at line feeds only (after Python's universal-newline reading), as
JSON Lines defines it: a record's string may hold other line separators (U+2028, U+0085)
unescaped, which ``json.dumps(..., ensure_ascii=False)`` writes so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imatrix.errors import ImatrixError

#: Dataset format by file extension (``format: auto``); anything else is text.
FORMAT_BY_SUFFIX = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def read_utf8(path: Path, what: str) -> str:
    """The file's text; ``what`` names what it should have been in the error."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ImatrixError(f"{path}: not {what} ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise ImatrixError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def jsonl_values(path: Path, field: str, limit: int | None = None) -> list[tuple[int, Any]]:
    """(line number, value of ``field``) of every record, in file order (the first
    ``limit`` only, if given; the lines after them are not parsed); blank lines are
    skipped."""
    out: list[tuple[int, Any]] = []
    for i, line in enumerate(read_utf8(path, "UTF-8").split("\n"), 1):
        if not line.strip():
            continue
        if limit is not None and len(out) >= limit:
            break
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ImatrixError(f"{path}:{i}: not a JSON object: {exc.msg}") from exc
        if not isinstance(rec, dict) or field not in rec:
            raise ImatrixError(f"{path}:{i}: record has no field '{field}'")
        out.append((i, rec[field]))
    return out


def jsonl_records(path: Path, field: str) -> list[str]:
    """The string ``field`` of every record, in file order."""
    out: list[str] = []
    for i, value in jsonl_values(path, field):
        if not isinstance(value, str):
            raise ImatrixError(f"{path}:{i}: field '{field}' is not a string")
        out.append(value)
    return out


def parquet_values(path: Path, column: str, limit: int | None = None) -> list[Any]:
    """The values of ``column``, in row order (the first ``limit`` rows only, if given,
    read as one batch rather than the whole column)."""
    import pyarrow.parquet as pq

    _parquet_type(path, column)
    if limit is None:
        values: list[Any] = pq.read_table(path, columns=[column]).column(0).to_pylist()
        return values
    batch = next(
        pq.ParquetFile(path).iter_batches(batch_size=max(limit, 1), columns=[column]), None
    )
    return [] if batch is None else batch.column(0).to_pylist()[:limit]


def parquet_records(path: Path, column: str) -> list[str]:
    """The text ``column`` of every row, in row order; no row may be null."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kind = _parquet_type(path, column)
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ImatrixError(f"{path}: column '{column}' is {kind}, not text")
    values: list[str | None] = pq.read_table(path, columns=[column]).column(column).to_pylist()
    if any(v is None for v in values):
        raise ImatrixError(f"{path}: column '{column}' has null values")
    return [v for v in values if v is not None]


def _parquet_type(path: Path, column: str) -> Any:
    """The Arrow type of ``column``, or an error: not a Parquet file, no such column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ImatrixError(f"{path}: not a Parquet file: {exc}") from exc
    if column not in schema.names:
        raise ImatrixError(f"{path}: no column '{column}' (columns: {', '.join(schema.names)})")
    return schema.field(column).type


__all__ = [
    "FORMAT_BY_SUFFIX",
    "jsonl_records",
    "jsonl_values",
    "parquet_records",
    "parquet_values",
    "read_utf8",
]
