"""The convergence plot: largest and median change between records against tokens.

One thin line per shard (its maximum), the merged view's maximum and median bold, and
the stop threshold as a dashed line, on a log scale (the changes fall by orders of
magnitude). matplotlib's object API with an Agg canvas, as :mod:`imatrix.plots`.

Every record is also a marker: a shard with few chunks has a single record, which a
line alone would not show; when no shard has two records, a note in the plot says
that there is no trend to see (rather than leaving the reader an empty frame).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from imatrix.convergence_table import VIEW_MERGED, VIEW_SHARD, finite_or_nan
from imatrix.plots import save_figure

log = logging.getLogger(__name__)

#: figure size (inches): readable at its real size in a report
FIG_SIZE = (8.0, 4.5)
#: shards named in the legend (more would hide the plot; the table names them all)
MAX_LABELLED = 8
#: markers of a shard's records, of the merged maximum and of the merged median (the
#: merged ones hollow: the worst shard's marker shows inside the ring of the maximum)
SHARD_MARKER: dict[str, Any] = {"marker": "o", "ms": 4.0}
MAX_MARKER: dict[str, Any] = {"marker": "o", "ms": 8.0, "mfc": "none", "mew": 1.5}
MEDIAN_MARKER: dict[str, Any] = {"marker": "s", "ms": 5.0, "mfc": "none", "mew": 1.5}
#: said in the plot when no shard has two records (nothing to draw a line between)
SINGLE_RECORD_NOTE = "one record per shard:\ntoo few chunks to show a trend"
#: the note's background: a grid line under it does not cross its letters
NOTE_BOX = {"boxstyle": "round,pad=0.3", "fc": "white", "ec": "0.7", "alpha": 0.9}


def shard_lines(shards: pd.DataFrame) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(dataset[/shard], tokens, max)`` of each shard's record (shard null: one file)."""
    out = []
    for key, rows in shards.groupby(["dataset", "shard"], dropna=False, sort=False):
        ds, sh = str(key[0]), key[1]
        name = ds if sh is None or sh is pd.NA else f"{ds}/{sh}"
        out.append((name, rows["tokens"].to_numpy(), rows["max"].to_numpy()))
    return out


def _merged(ax: Axes, merged: pd.DataFrame, *, with_max: bool) -> None:
    """The merged view: its maximum (when there are several shards) and its median."""
    tokens = merged["tokens"].to_numpy()
    if with_max:
        mx = finite_or_nan(merged["max"].to_numpy())
        ax.plot(tokens, mx, "k-", lw=2.0, label="all: max", **MAX_MARKER)
    med = finite_or_nan(merged["median"].to_numpy())
    ax.plot(tokens, med, "k:", lw=2.0, label="all: median", **MEDIAN_MARKER)


def convergence_figure(df: pd.DataFrame, *, eps: float, title: str) -> Figure:
    """The figure of :func:`plot_convergence`."""
    fig = Figure(figsize=FIG_SIZE)
    ax = fig.add_subplot(1, 1, 1)
    lines = shard_lines(df[df["view"] == VIEW_SHARD])
    for name, tokens, mx in lines:
        label = f"{name} max" if len(lines) <= MAX_LABELLED else None
        ax.plot(tokens, finite_or_nan(mx), lw=0.9, label=label, **SHARD_MARKER)
    merged = df[df["view"] == VIEW_MERGED]
    _merged(ax, merged, with_max=len(lines) > 1)
    ax.axhline(eps, color="tab:red", ls="--", lw=1.0, label=f"EPS {eps:g}")
    ax.set_yscale("log")
    ax.set_xlabel("tokens collected (per shard)")
    ax.set_ylabel("1 − cos between records")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    longest = max([len(t) for _, t, _ in lines] + [len(merged)])
    if longest < 2:
        # the records share one number of tokens, the middle of the axis: top left is
        # clear of them, and of the legend (top right)
        ax.text(0.02, 0.97, SINGLE_RECORD_NOTE, transform=ax.transAxes, va="top", bbox=NOTE_BOX)
    ax.legend(fontsize="small", ncol=2, loc="upper right" if longest < 2 else "best")
    fig.tight_layout()
    return fig


def plot_convergence(df: pd.DataFrame, path: str | Path, *, eps: float, title: str) -> Path:
    """Write the plot of a :func:`imatrix.convergence_table.convergence_table` frame."""
    return save_figure(convergence_figure(df, eps=eps, title=title), path)


__all__ = ["SINGLE_RECORD_NOTE", "convergence_figure", "plot_convergence", "shard_lines"]
