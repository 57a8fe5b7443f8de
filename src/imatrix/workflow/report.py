"""Parquet tables as one HTML page, which Snakemake's report shows inline."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imatrix.atomic import atomic_write

#: Style of the page: compact right-aligned tables.
STYLE = (
    "<style>body{font-family:sans-serif}table{border-collapse:collapse;font-size:12px}"
    "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}</style>"
)


def _html_table(df: Any, title: str) -> str:
    table: str = df.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.6g}")
    return f"<h2>{title}</h2>\n" + table


def write_html_report(output: str, title: str, tables: Mapping[str, Any]) -> Path:
    """One HTML page with a heading per table, in the order given (title -> Parquet file,
    or a DataFrame for a view computed from one)."""
    import pandas as pd

    parts = [
        "<!DOCTYPE html>",
        f"<html><head><meta charset='utf-8'><title>{title}</title>",
        STYLE + "</head><body>",
        f"<h1>{title}</h1>",
    ]
    for name, table in tables.items():
        df = table if isinstance(table, pd.DataFrame) else pd.read_parquet(table)
        parts.append(_html_table(df, name))
    parts.append("</body></html>")
    atomic_write(output, "\n".join(parts).encode("utf-8"))
    return Path(output)


def write_statistics_report(
    output: str,
    model: str,
    tensors: str,
    layers: str,
    coverage: str,
    min_expert_tokens: int,
) -> Path:
    """The statistics page: layers and tensors, and for a MoE model a small view of the
    expert coverage (per dataset and layer, :func:`imatrix.coverage.layer_view`)."""
    import pandas as pd

    from imatrix.coverage import layer_view

    tables: dict[str, Any] = {"Layers": layers, "Tensors": tensors}
    view = layer_view(pd.read_parquet(coverage), min_expert_tokens)
    if not view.empty:
        tables["Expert coverage (tokens per expert, least covered tensor of each layer)"] = view
    return write_html_report(output, f"imatrix statistics of {model}", tables)
