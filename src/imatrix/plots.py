"""Pictures of an imatrix: statistics per layer and tensor kind, MoE expert coverage, and
how two imatrices differ.

Why matplotlib's object API with an explicit Agg canvas (no ``pyplot``): plots are
written from worker processes and tests without a display, and pyplot's global figure
state would leak memory across calls. Every PNG is written through
:func:`imatrix.atomic.atomic_output`, so a failed run never leaves a half-written
picture under the final name.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from imatrix.atomic import atomic_output
from imatrix.errors import ImatrixError
from imatrix.model import ImatrixData
from imatrix.stats import PLOTTABLE, lround_counts, split_name

log = logging.getLogger(__name__)

#: column -> (short colour-bar label, description for the title, logarithmic colour scale)
LABELS: dict[str, tuple[str, str, bool]] = {
    "sum_sqact": ("Σ(Act²)", "sum of the per-channel mean squared activations", True),
    "sqact_mean": ("μ", "mean of the per-channel mean squared activations", True),
    "sqact_max": ("max", "largest per-channel mean squared activation", True),
    "sqact_std": ("σ", "std. deviation of the per-channel mean squared activations", True),
    "active_pct": ("% active", "channels with mean Act² > 1e-5", False),
    "entropy": ("H (bits)", "entropy of the importance distribution", False),
    "entropy_norm_pct": ("H Norm (%)", "entropy normalized by log₂ N", False),
    "zd_pct": ("ZD (%)", "channels with z-score > 1", False),
    "cossim": ("CosSim", "cosine similarity of Σ Act² with the previous layer", False),
    "l2_dist": ("L₂ Dist", "L₂ distance of mean activations to the previous layer", False),
    "cossim_act": (
        "CosSim",
        "cosine similarity of mean activations with the previous layer",
        False,
    ),
    "ecs": ("ECS", "Euclidean-Cosine score against the previous layer", False),
    "act_zd_pct": ("ZD (%)", "mean activations with |z| > 1", False),
}

#: the heat maps ``imatrix stats --plot`` writes by default
DEFAULT_STATISTICS = ("sum_sqact", "entropy_norm_pct", "zd_pct", "cossim")
PREFERRED_STATISTICS = ("l2_dist", "cossim_act", "ecs")
#: resolution of every PNG (dots per inch): readable at its real size in a report
DPI = 110


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG, atomically."""
    p = Path(path)
    FigureCanvasAgg(fig)
    with atomic_output(p) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    log.info("wrote %s", p)
    return p


def _grid(df: pd.DataFrame, column: str) -> tuple[np.ndarray, list[str], list[int]]:
    """``kinds × layers`` matrix of ``column`` (NaN where a kind is absent in a layer)."""
    t = df[df["layer"].notna()]
    if t.empty:
        raise ImatrixError("no tensors inside blocks (blk.N.*): nothing to plot per layer")
    piv = t.pivot_table(
        index="tensor", columns="layer", values=column, aggfunc="first", dropna=False
    )
    piv = piv.reindex(columns=sorted(int(c) for c in piv.columns))
    return (
        piv.to_numpy(dtype=np.float64, na_value=np.nan),
        [str(i) for i in piv.index],
        [int(c) for c in piv.columns],
    )


#: heat maps with more cells are not labelled at all (the text would cost more than it says)
MAX_LABELLED_CELLS = 400
MAX_LABELLED_EXPERT_CELLS = 256
#: font size of heat-map cell labels, and the smallest it may shrink to before labels are dropped
CELL_FONT_PT = 7.0
MIN_CELL_FONT_PT = 5.5
#: width of a label character and height of a line, in font sizes (DejaVu Sans digits)
_CHAR_EM = 0.62
_LINE_EM = 1.3
_SI_SUFFIXES = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def compact_number(v: float) -> str:
    """A short label: three significant digits, thousands as k/M/G/T (185k, 1.32k,
    0.998), small values as 8.9e-4, so that cell labels and colour-bar ticks stay narrow."""
    if not np.isfinite(v):
        return ""
    a = abs(v)
    for div, suffix in _SI_SUFFIXES:
        if a >= div * 0.9995:  # 999.6 rounds to "1k", not "1e+03"
            return f"{v / div:.3g}{suffix}"
    if 0 < a < 0.01:  # 8.9e-4, not 0.000889 or 8.89e-04
        mantissa, exponent = f"{v:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{v:.3g}"


def _heat(
    fig: Figure,
    ax: Axes,
    grid: np.ndarray,
    rows: Sequence[str],
    cols: Sequence[int],
    *,
    log_scale: bool,
    label: str,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
) -> tuple[mpl.colors.Colormap, Normalize]:
    """The heat map and its colour bar; returns what :func:`_annotate` needs once the
    figure is laid out (the cell size is only known then)."""
    m = np.ma.masked_invalid(grid)
    norm: Normalize
    finite = grid[np.isfinite(grid)]
    if log_scale and finite.size and (finite > 0).all():
        norm = LogNorm(vmin=vmin or float(finite.min()), vmax=vmax or float(finite.max()))
    else:
        lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
        hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
        norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-12)
    colormap = mpl.colormaps[cmap].with_extremes(bad="#d0d0d0")
    im = ax.imshow(m, aspect="auto", interpolation="nearest", cmap=colormap, norm=norm)
    ax.set_yticks(range(len(rows)), labels=list(rows))
    step = max(1, len(cols) // 32)
    ax.set_xticks(range(0, len(cols), step), labels=[str(c) for c in cols[::step]])
    ax.set_xlabel("layer")
    cb = fig.colorbar(im, ax=ax, label=label)
    ticks = FuncFormatter(lambda v, _pos: compact_number(v))
    if isinstance(norm, LogNorm):
        # labels at powers of ten only (1, 2, 5 as well when the range is under a
        # decade); the minor ticks stay as unlabelled marks, which used to pile up
        decades = np.log10(norm.vmax / norm.vmin) if norm.vmin and norm.vmax else 0.0
        subs = (1.0,) if decades >= 1 else (1.0, 2.0, 5.0)
        cb.ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
        cb.ax.yaxis.set_minor_formatter(NullFormatter())
    cb.ax.yaxis.set_major_formatter(ticks)
    return colormap, norm


def _cell_font(fig: Figure, ax: Axes, grid: np.ndarray, labels: list[str]) -> float | None:
    """The largest font (CELL_FONT_PT down to MIN_CELL_FONT_PT) at which the widest label
    fits its cell, or None when even the smallest does not."""
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.canvas.draw()  # the laid-out axes size
    box = ax.get_window_extent()
    cell_w = box.width / max(1, grid.shape[1]) * 72.0 / fig.dpi
    cell_h = box.height / max(1, grid.shape[0]) * 72.0 / fig.dpi
    widest = max((len(t) for t in labels), default=0)
    for size in (CELL_FONT_PT, 6.5, 6.0, MIN_CELL_FONT_PT):
        if widest * _CHAR_EM * size <= 0.92 * cell_w and _LINE_EM * size <= cell_h:
            return size
    return None


def _annotate(
    fig: Figure, ax: Axes, grid: np.ndarray, colormap: mpl.colors.Colormap, norm: Normalize
) -> bool:
    """Write each cell's value into it, in black or white for contrast, when the labels
    fit their cells; returns whether they were written."""
    cells = [(i, j, float(v)) for (i, j), v in np.ndenumerate(grid) if np.isfinite(v)]
    labels = [compact_number(v) for _, _, v in cells]
    size = _cell_font(fig, ax, grid, labels)
    if size is None:
        log.debug("heat map cells too small for their labels: values left to the colour bar")
        return False
    for (i, j, v), text in zip(cells, labels, strict=True):
        rgba = colormap(norm(v))
        dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5
        ax.text(
            j, i, text, ha="center", va="center", fontsize=size, color="white" if dark else "black"
        )
    return True


def plot_layer_heatmap(
    tensors: pd.DataFrame,
    path: str | Path,
    statistic: str = "sum_sqact",
    *,
    title: str | None = None,
    log_scale: bool | None = None,
) -> Path:
    """Heat map of one per-tensor statistic: tensor kinds (rows) by layer (columns).

    ``tensors`` is the per-tensor frame of :func:`imatrix.stats.compute_statistics`.
    Grey cells: the kind is absent in that layer or the statistic is undefined (e.g.
    CosSim of layer 0).
    """
    if statistic not in tensors.columns or statistic not in PLOTTABLE:
        raise ImatrixError(f"unknown statistic '{statistic}' (choose from {', '.join(PLOTTABLE)})")
    grid, rows, cols = _grid(tensors, statistic)
    label, desc, default_log = LABELS.get(statistic, (statistic, statistic, False))
    fig = Figure(figsize=(max(7.0, 2.0 + 0.45 * len(cols)), max(3.5, 1.4 + 0.4 * len(rows))))
    ax = fig.add_subplot()
    cmap, norm = _heat(
        fig,
        ax,
        grid,
        rows,
        cols,
        log_scale=default_log if log_scale is None else log_scale,
        label=label,
    )
    ax.set_title(title or f"{label} by layer and tensor kind\n({desc})", fontsize=10)
    fig.tight_layout()
    if grid.size <= MAX_LABELLED_CELLS:
        _annotate(fig, ax, grid, cmap, norm)
    return save_figure(fig, path)


def expert_counts(data: ImatrixData) -> tuple[np.ndarray, list[int], str] | None:
    """``layers × experts`` token counts of the MoE tensors (the least-covered kind per
    layer), or None for a dense model."""
    per_layer: dict[int, np.ndarray] = {}
    kinds: set[str] = set()
    for name, e in data.entries.items():
        if e.n_counts <= 1:
            continue
        layer_s, kind = split_name(name)
        if not layer_s.isdigit():
            continue
        kinds.add(kind)
        c = lround_counts(e.counts).astype(np.float64)
        lay = int(layer_s)
        if lay in per_layer and per_layer[lay].size == c.size:
            per_layer[lay] = np.minimum(per_layer[lay], c)
        else:
            per_layer[lay] = c
    if not per_layer:
        return None
    n = max(v.size for v in per_layer.values())
    layers = sorted(per_layer)
    grid = np.full((len(layers), n), np.nan)
    for i, lay in enumerate(layers):
        grid[i, : per_layer[lay].size] = per_layer[lay]
    return grid, layers, ", ".join(sorted(kinds))


def plot_expert_counts(
    data: ImatrixData, path: str | Path, *, title: str | None = None
) -> Path | None:
    """Tokens routed to each expert, per layer (rows) and expert (columns); experts that
    never fired are marked with a red ✕. Returns None (and writes nothing) for dense
    models."""
    ec = expert_counts(data)
    if ec is None:
        log.info("no expert tensors: skipping the expert-count plot")
        return None
    grid, layers, kinds = ec
    fig = Figure(figsize=(max(7.0, 2.0 + 0.35 * grid.shape[1]), max(3.5, 1.6 + 0.3 * len(layers))))
    ax = fig.add_subplot()
    shown = np.where(grid > 0, grid, np.nan)
    cmap, norm = _heat(
        fig,
        ax,
        shown,
        [str(x) for x in layers],
        list(range(grid.shape[1])),
        log_scale=False,
        label="tokens routed to the expert",
        cmap="magma",
        vmin=0.0,
    )
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    dead_i, dead_j = np.nonzero(grid == 0)
    if dead_i.size:
        ax.scatter(dead_j, dead_i, marker="x", color="red", s=60, label="never fired")
        ax.legend(loc="upper left", bbox_to_anchor=(1.25, 1.0), fontsize=7)
    n_dead = int(dead_i.size)
    ax.set_title(
        title or f"Tokens per expert, {n_dead} never fired\n(least covered of: {kinds})",
        fontsize=10,
    )
    fig.tight_layout()
    if grid.size <= MAX_LABELLED_EXPERT_CELLS:
        _annotate(fig, ax, shown, cmap, norm)
    return save_figure(fig, path)


def plot_comparison(
    cmp: pd.DataFrame,
    path: str | Path,
    *,
    labels: tuple[str, str] = ("A", "B"),
    title: str | None = None,
) -> Path:
    """Two heat maps of :func:`imatrix.stats.compare_imatrices` by tensor kind and layer:
    cosine similarity of the per-channel importances, and log₂ of the ratio of their
    means (B over A: red = B larger)."""
    both = cmp[cmp["in_a"] & cmp["in_b"]].copy()
    if both.empty:
        raise ImatrixError("the two imatrices have no tensors in common")
    both["log2_ratio"] = np.log2(both["mean_ratio"].to_numpy(np.float64))
    g1, rows, cols = _grid(both, "cossim")
    g2, _, _ = _grid(both, "log2_ratio")
    width = max(7.0, 1.5 + 0.45 * len(cols))
    fig = Figure(figsize=(width, max(5.0, 2.0 + 0.8 * len(rows))))
    ax1, ax2 = fig.subplots(2, 1)
    fin = g1[np.isfinite(g1)]
    heat1 = _heat(
        fig,
        ax1,
        g1,
        rows,
        cols,
        log_scale=False,
        label="cosine similarity",
        cmap="viridis",
        vmin=min(float(fin.min()) if fin.size else 0.0, 0.999),
        vmax=1.0,
    )
    ax1.set_title("Cosine similarity of per-channel importance (mean Act²)")
    fin2 = np.abs(g2[np.isfinite(g2)])
    lim = max(float(fin2.max()) if fin2.size else 0.0, 1e-3)
    heat2 = _heat(
        fig,
        ax2,
        g2,
        rows,
        cols,
        log_scale=False,
        label=f"log₂(mean {labels[1]} / mean {labels[0]})",
        cmap="RdBu_r",
        vmin=-lim,
        vmax=lim,
    )
    ax2.set_title("Change of mean importance")
    fig.suptitle(title or f"{labels[0]} vs {labels[1]}")
    fig.tight_layout()
    if g1.size <= MAX_LABELLED_CELLS:
        _annotate(fig, ax1, g1, *heat1)
        _annotate(fig, ax2, g2, *heat2)
    return save_figure(fig, path)


def write_plots(
    data: ImatrixData,
    tensors: pd.DataFrame,
    outdir: str | Path,
    statistics: Sequence[str] | None = None,
) -> list[Path]:
    """The standard set for ``imatrix stats --plot`` and the workflow: one heat map per
    statistic (``layers_<statistic>.png``) and, for MoE models, ``expert_counts.png``."""
    out = Path(outdir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImatrixError(f"{out}: cannot create directory: {exc.strerror or exc}") from exc
    if statistics is None:
        statistics = DEFAULT_STATISTICS
        if bool(tensors["has_sums"].all()):
            statistics = (*statistics, *PREFERRED_STATISTICS)
    written = [plot_layer_heatmap(tensors, out / f"layers_{s}.png", s) for s in statistics]
    ec = plot_expert_counts(data, out / "expert_counts.png")
    if ec is not None:
        written.append(ec)
    return written
