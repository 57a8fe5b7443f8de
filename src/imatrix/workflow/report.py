"""Parquet tables as one HTML page, which Snakemake's report shows inline."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
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


#: summary columns that say where things are: the last columns of the evaluation table
PATH_COLUMNS = ("path", "base", "imatrix_file", "text")
#: summary columns shown in the lead columns instead (formatted together)
_FOLDED = (
    "file_size",
    "bpw",
    "kld_mean",
    "kld_ci_low",
    "kld_ci_high",
    "same_top_p",
    "ppl",
    "ppl_err",
)


def _kld(row: Any) -> str:
    mean, lo, hi = row["kld_mean"], row.get("kld_ci_low"), row.get("kld_ci_high")
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{mean:.5f}"
    return f"{mean:.5f} ± {(hi - lo) / 2:.5f}"


def evaluation_table(df: Any) -> Any:
    """The evaluation summary as people compare quants: type, recipe, imatrix (and
    evaluation text), size, bits per weight, KLD mean ± half its 95 % interval, same-top, PPL
    first, formatted; then the other figures; the paths last. The base first, then by
    file size."""
    import pandas as pd

    df = df.sort_values(["is_base", "file_size"], ascending=[False, True], kind="stable")
    recipe = df["recipe"] if "recipe" in df.columns else pd.Series([None] * len(df), index=df.index)
    lead = pd.DataFrame(
        {
            "type": df["type"],
            "recipe": recipe.fillna(""),
            "imatrix": df["imatrix"].map(lambda v: "yes" if v else "no"),
            **({"eval set": df["eval_set"]} if "eval_set" in df.columns else {}),
            "size (MB)": (df["file_size"] / 1e6).map(lambda v: f"{v:,.1f}"),
            "bits/weight": df["bpw"].map(lambda v: f"{v:.3f}"),
            "KLD mean ± 95 % CI": df.apply(_kld, axis=1),
            "same top (%)": (df["same_top_p"] * 100).map(lambda v: f"{v:.2f}"),
            "PPL": [f"{p:.2f} ± {e:.2f}" for p, e in zip(df["ppl"], df["ppl_err"], strict=True)],
        }
    )
    skip = {"type", "recipe", "imatrix", "eval_set", *_FOLDED, *PATH_COLUMNS}
    rest = [c for c in df.columns if c not in skip]
    paths = [c for c in PATH_COLUMNS if c in df.columns]
    return pd.concat([lead, df[rest], df[paths]], axis=1).reset_index(drop=True)


def write_html_report(
    output: str,
    title: str,
    tables: Mapping[str, Any],
    shape: Callable[[Any], Any] | None = None,
) -> Path:
    """One HTML page with a heading per table, in the order given (title -> Parquet file,
    or a DataFrame for a view computed from one); ``shape`` rearranges each table first
    (e.g. :func:`evaluation_table`)."""
    import pandas as pd

    parts = [
        "<!DOCTYPE html>",
        f"<html><head><meta charset='utf-8'><title>{title}</title>",
        STYLE + "</head><body>",
        f"<h1>{title}</h1>",
    ]
    for name, table in tables.items():
        df = table if isinstance(table, pd.DataFrame) else pd.read_parquet(table)
        parts.append(_html_table(shape(df) if shape is not None else df, name))
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
    convergence: str | None = None,
) -> Path:
    """The statistics page: layers and tensors, every shard's convergence record, and
    for a MoE model a small view of the expert coverage (per dataset and layer,
    :func:`imatrix.coverage.layer_view`)."""
    import pandas as pd

    from imatrix.coverage import layer_view

    tables: dict[str, Any] = {"Layers": layers, "Tensors": tensors}
    if convergence is not None:
        tables["Convergence (every shard's record and the merged view)"] = convergence
    view = layer_view(pd.read_parquet(coverage), min_expert_tokens)
    if not view.empty:
        tables["Expert coverage (tokens per expert, least covered tensor of each layer)"] = view
    return write_html_report(output, f"imatrix statistics of {model}", tables)


def plot_evaluation(summary: str, output: str, *, title: str = "") -> Path:
    """The KLD-vs-size plot of an evaluation summary file."""
    import pandas as pd

    from imatrix.eval_plots import plot_kld_vs_size

    return plot_kld_vs_size(pd.read_parquet(summary), output, title=title)
