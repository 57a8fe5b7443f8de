"""The picture of an evaluation: KL divergence against file size, stock and planned quants.

Why this plot: the question a quant sweep answers is "which file of N bytes is best",
so every quant is a point at its file size and mean KLD. Planned mixes
(``imatrix plan``) should form the lower envelope of the stock types; they carry
their 95 % confidence interval as error bars (so are the stock points, where known),
since two mixes within each other's interval are not told apart by this text. With
several evaluation texts (an ``eval_set`` column with more than one value), one panel
per text, on a shared size axis.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from imatrix.errors import ImatrixError
from imatrix.plots import compact_number, save_figure

log = logging.getLogger(__name__)

#: (label, marker, colour, filled) of each kind of point
KINDS: dict[str, tuple[str, str, str, bool]] = {
    "planned": ("planned mix (imatrix plan)", "D", "tab:red", True),
    "imatrix": ("stock type, with the imatrix", "o", "tab:blue", True),
    "plain": ("stock type, without imatrix", "s", "tab:gray", False),
}
#: KLD below this is drawn at it on the logarithmic axis (a lossless requantization)
KLD_FLOOR = 1e-6
PANEL_HEIGHT_IN = 4.6
WIDTH_IN = 8.0


def point_kind(row: pd.Series) -> str:
    """planned (it has a recipe), imatrix (a stock type with it) or plain."""
    recipe = row.get("recipe")
    if isinstance(recipe, str) and recipe:
        return "planned"
    return "imatrix" if bool(row["imatrix"]) else "plain"


def _label(row: pd.Series) -> str:
    recipe = row.get("recipe")
    return str(recipe) if isinstance(recipe, str) and recipe else str(row["type"])


def _column(df: pd.DataFrame, name: str) -> np.ndarray:
    """A float column, NaN where the summary predates it."""
    if name not in df.columns:
        return np.full(len(df), np.nan)
    return df[name].to_numpy(np.float64)


def _panel(ax: Axes, df: pd.DataFrame, title: str) -> None:
    """One evaluation text: every quant at (file size, mean KLD) with its interval."""
    kinds = df.apply(point_kind, axis=1) if len(df) else pd.Series(dtype=str)
    for kind, (label, marker, colour, filled) in KINDS.items():
        part = df[kinds == kind].sort_values("file_size")
        if part.empty:
            continue
        x = part["file_size"].to_numpy(np.float64) / 1e6
        y = np.maximum(part["kld_mean"].to_numpy(np.float64), KLD_FLOOR)
        lo = np.maximum(_column(part, "kld_ci_low"), KLD_FLOOR)
        hi = _column(part, "kld_ci_high")
        err = np.where(np.isfinite(lo) & np.isfinite(hi), [y - np.minimum(lo, y), hi - y], 0.0)
        ax.errorbar(
            x,
            y,
            yerr=np.maximum(err, 0.0),
            fmt=marker,
            color=colour,
            mfc=colour if filled else "none",
            ms=6,
            capsize=3,
            elinewidth=1,
            ls="--" if kind == "planned" else "none",
            lw=0.8,
            label=label,
        )
        for xi, yi, (_, row) in zip(x, y, part.iterrows(), strict=True):
            ax.annotate(
                _label(row),
                (xi, yi),
                # left of the point: apart from the same type with the imatrix
                xytext=(-6, 3) if kind == "plain" else (5, 3),
                ha="right" if kind == "plain" else "left",
                textcoords="offset points",
                fontsize=7,
                color=colour,
            )
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: compact_number(v)))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: compact_number(v)))
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("mean KL divergence from the base")
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper right")


def plot_kld_vs_size(summary: pd.DataFrame, path: str | Path, *, title: str = "") -> Path:
    """KLD against file size of every quant of an evaluation summary (the base left out),
    one panel per evaluation text when the summary has several (``eval_set``)."""
    return save_figure(kld_figure(summary, title=title), path)


def kld_figure(summary: pd.DataFrame, *, title: str = "") -> Figure:
    """The figure of :func:`plot_kld_vs_size`."""
    df = summary[~summary["is_base"].astype(bool)]
    if df.empty:
        raise ImatrixError("the evaluation summary has no quantized model to plot")
    sets: list[object] = [None]
    if "eval_set" in df.columns and df["eval_set"].nunique(dropna=False) > 1:
        sets = sorted(df["eval_set"].unique(), key=str)
    fig = Figure(figsize=(WIDTH_IN, PANEL_HEIGHT_IN * len(sets)))
    axes = fig.subplots(len(sets), 1, squeeze=False, sharex=True)[:, 0]
    for ax, s in zip(axes, sets, strict=True):
        part = df if s is None else df[df["eval_set"] == s]
        name = f"evaluation text: {s}" if s is not None else "KL divergence against file size"
        _panel(ax, part, f"{title}{' — ' if title else ''}{name}")
    fig.tight_layout()
    return fig
