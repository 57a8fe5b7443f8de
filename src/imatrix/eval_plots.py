"""The picture of an evaluation: KL divergence against file size, stock and planned quants.

Why this plot: the question a quant sweep answers is "which file of N bytes is best",
so every quant is a point at its file size and mean KLD. Planned mixes
(``imatrix plan``) should form the lower envelope of the stock types; they carry
their 95 % confidence interval as error bars (so are the stock points, where known),
since two mixes within each other's interval are not told apart by this text. With
several evaluation texts (an ``eval_set`` column with more than one value), one panel
per text, on a shared size axis.

Readability: points at the same size and KLD (a planned mix that came out as a stock
type, two plans that chose the same recipe) get one label, "A = B"; the other labels
are placed so that none covers another (:mod:`imatrix.plot_labels`); the log axis
labels a few round values only; the legend sits below the panels, over no point.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

from imatrix.errors import ImatrixError
from imatrix.plot_labels import PointLabel, place_labels
from imatrix.plots import DPI, compact_number, save_figure

log = logging.getLogger(__name__)

#: (label, marker, colour, filled) of each kind of point
KINDS: dict[str, tuple[str, str, str, bool]] = {
    "planned": ("planned mix (imatrix plan)", "D", "tab:red", True),
    "imatrix": ("stock type, with the imatrix", "o", "tab:blue", True),
    "plain": ("stock type, without imatrix", "s", "tab:gray", False),
}
#: order of the names in one label of coincident points: the stock type first
LABEL_ORDER = ("imatrix", "plain", "planned")
#: colour of a label naming points of several kinds
MIXED_COLOUR = "0.2"
#: KLD below this is drawn at it on the logarithmic axis (a lossless requantization)
KLD_FLOOR = 1e-6
#: points whose file sizes and mean KLDs differ by less than these fractions are one
#: point with one label (the same recipe, or files that differ only in metadata)
SAME_SIZE_RTOL = 1e-3
SAME_KLD_RTOL = 1e-3
#: labelled KLD ticks, coarsest first: the first set that puts two ticks on the axis
#: (powers of ten; then 1-2-5; then every digit, widening a narrow axis to two ticks)
TICK_MANTISSAS: tuple[tuple[float, ...], ...] = (
    (1.0,),
    (1.0, 2.0, 5.0),
    (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0),
)
PANEL_HEIGHT_IN = 4.6
WIDTH_IN = 8.0
LEGEND_FONT_SIZE = 8.0


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


def _drawn_kld(df: pd.DataFrame) -> np.ndarray:
    kld: np.ndarray = np.maximum(df["kld_mean"].to_numpy(np.float64), KLD_FLOOR)
    return kld


def coincident_groups(df: pd.DataFrame) -> list[list[int]]:
    """Positions (0-based, in ``df``'s order) of the points that share a file size and a
    mean KLD within SAME_SIZE_RTOL and SAME_KLD_RTOL, each group in first-seen order."""
    size, kld = df["file_size"].to_numpy(np.float64), _drawn_kld(df)
    groups: list[list[int]] = []
    for i in range(len(df)):
        for g in groups:
            j = g[0]
            if np.isclose(size[i], size[j], rtol=SAME_SIZE_RTOL, atol=0) and np.isclose(
                kld[i], kld[j], rtol=SAME_KLD_RTOL, atol=0
            ):
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def group_label(rows: pd.DataFrame) -> PointLabel:
    """One label for coincident points: "Q4_K_M = mix-Q4_K_M", the stock type first; a
    stock type without the imatrix says so when it shares the label with other kinds."""
    kinds = [point_kind(r) for _, r in rows.iterrows()]
    names: list[str] = []
    for kind in LABEL_ORDER:
        for (_, row), k in zip(rows.iterrows(), kinds, strict=True):
            name = _label(row)
            if k == kind and kind == "plain" and len(set(kinds)) > 1:
                name += " (no imatrix)"
            if k == kind and name not in names:
                names.append(name)
    one_kind = len(set(kinds)) == 1
    return PointLabel(
        x=float(rows["file_size"].iloc[0]) / 1e6,
        y=float(_drawn_kld(rows)[0]),
        text=" = ".join(names),
        colour=KINDS[kinds[0]][2] if one_kind else MIXED_COLOUR,
        # left of the point: apart from the same type with the imatrix
        left_first=one_kind and kinds[0] == "plain",
    )


def point_labels(df: pd.DataFrame) -> list[PointLabel]:
    """The labels of a panel's points, in the order they are placed: planned mixes,
    then stock types with and without the imatrix, each by file size."""
    rank = {kind: i for i, kind in enumerate(KINDS)}
    keyed = df.assign(_rank=[rank[point_kind(r)] for _, r in df.iterrows()])
    ordered = keyed.sort_values(["_rank", "file_size"], kind="stable")
    return [group_label(ordered.iloc[g]) for g in coincident_groups(ordered)]


def log_ticks(lo: float, hi: float) -> tuple[list[float], float, float]:
    """The labelled ticks of a log axis from ``lo`` to ``hi`` and the axis limits: the
    coarsest set of TICK_MANTISSAS with two ticks inside; where even every digit gives
    fewer, the limits widen to the digits around them."""
    decades = np.arange(np.floor(np.log10(lo)) - 1, np.ceil(np.log10(hi)) + 1)
    ticks: list[float] = []
    for mantissas in TICK_MANTISSAS:
        every = sorted(float(f"{m * 10.0**d:.6g}") for d in decades for m in mantissas)
        ticks = [t for t in every if lo <= t <= hi]
        if len(ticks) >= 2:
            return ticks, lo, hi
    below = max(t for t in every if t <= lo)
    above = min(t for t in every if t >= hi)
    return [t for t in every if below <= t <= above], below, above


def _kld_axis(ax: Axes) -> None:
    """Log scale; only the ticks of :func:`log_ticks` carry a number."""
    ax.set_yscale("log")
    ticks, lo, hi = log_ticks(*ax.get_ylim())
    ax.set_ylim(lo, hi)
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: compact_number(v)))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _panel(ax: Axes, df: pd.DataFrame, title: str) -> list[PointLabel]:
    """One evaluation text: every quant at (file size, mean KLD) with its interval; the
    labels to place once the layout is final."""
    kinds = df.apply(point_kind, axis=1) if len(df) else pd.Series(dtype=str)
    for kind, (label, marker, colour, filled) in KINDS.items():
        part = df[kinds == kind].sort_values("file_size")
        if part.empty:
            continue
        x = part["file_size"].to_numpy(np.float64) / 1e6
        y = _drawn_kld(part)
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
    _kld_axis(ax)
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("mean KL divergence from the base")
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(title, fontsize=10)
    return point_labels(df)


def _legend(fig: Figure, axes: Sequence[Axes]) -> Legend:
    """One legend for every panel, at the bottom of the figure: it covers no point."""
    entries: dict[str, Artist] = {}
    for ax in axes:
        for handle, text in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(text, handle)
    texts = [k[0] for k in KINDS.values() if k[0] in entries]
    handles = [entries[t] for t in texts]
    return fig.legend(
        handles, texts, loc="lower center", ncol=len(texts), fontsize=LEGEND_FONT_SIZE
    )


def plot_kld_vs_size(summary: pd.DataFrame, path: str | Path, *, title: str = "") -> Path:
    """KLD against file size of every quant of an evaluation summary (the base left out),
    one panel per evaluation text when the summary has several (``eval_set``)."""
    return save_figure(kld_figure(summary, title=title), path)


def kld_figure(summary: pd.DataFrame, *, title: str = "") -> Figure:
    """The figure of :func:`plot_kld_vs_size`, laid out at the resolution it is saved at
    (the labels are placed in pixels)."""
    df = summary[~summary["is_base"].astype(bool)]
    if df.empty:
        raise ImatrixError("the evaluation summary has no quantized model to plot")
    sets: list[object] = [None]
    if "eval_set" in df.columns and df["eval_set"].nunique(dropna=False) > 1:
        sets = sorted(df["eval_set"].unique(), key=str)
    fig = Figure(figsize=(WIDTH_IN, PANEL_HEIGHT_IN * len(sets)), dpi=DPI)
    renderer = FigureCanvasAgg(fig).get_renderer()  # type: ignore[no-untyped-call]
    axes: list[Axes] = list(fig.subplots(len(sets), 1, squeeze=False, sharex=True)[:, 0])
    labels = []
    for ax, s in zip(axes, sets, strict=True):
        part = df if s is None else df[df["eval_set"] == s]
        name = f"evaluation text: {s}" if s is not None else "KL divergence against file size"
        labels.append(_panel(ax, part, f"{title}{' — ' if title else ''}{name}"))
    legend = _legend(fig, axes)
    fig.tight_layout(rect=(0, legend.get_window_extent(renderer).y1 / fig.bbox.height, 1, 1))
    for ax, lab in zip(axes, labels, strict=True):
        place_labels(ax, lab, renderer)
    return fig
