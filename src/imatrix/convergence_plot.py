"""The convergence plot: largest and median change between records against tokens.

One thin line per shard (its maximum), the merged view's maximum and median bold, and
the stop threshold as a dashed line, on a log scale (the changes fall by orders of
magnitude). matplotlib's object API with an Agg canvas, as :mod:`imatrix.plots`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from imatrix.atomic import atomic_output
from imatrix.convergence_table import VIEW_MERGED, VIEW_SHARD, finite_or_nan

log = logging.getLogger(__name__)

#: figure size (inches) and resolution: readable at its real size in a report
FIG_SIZE = (8.0, 4.5)
DPI = 110
#: shards named in the legend (more would hide the plot; the table names them all)
MAX_LABELLED = 8


def shard_lines(shards: pd.DataFrame) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(dataset[/shard], tokens, max)`` of each shard's record (shard null: one file)."""
    out = []
    for key, rows in shards.groupby(["dataset", "shard"], dropna=False, sort=False):
        ds, sh = str(key[0]), key[1]
        name = ds if sh is None or sh is pd.NA else f"{ds}/{sh}"
        out.append((name, rows["tokens"].to_numpy(), rows["max"].to_numpy()))
    return out


def plot_convergence(df: pd.DataFrame, path: str | Path, *, eps: float, title: str) -> Path:
    """Write the plot of a :func:`imatrix.convergence_table.convergence_table` frame."""
    fig = Figure(figsize=FIG_SIZE)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    shards = df[df["view"] == VIEW_SHARD]
    lines = shard_lines(shards)
    for name, tokens, mx in lines:
        label = f"{name} max" if len(lines) <= MAX_LABELLED else None
        ax.plot(tokens, finite_or_nan(mx), lw=0.9, label=label)
    merged = df[df["view"] == VIEW_MERGED]
    if len(lines) > 1:
        ax.plot(
            merged["tokens"],
            finite_or_nan(merged["max"].to_numpy()),
            "k-",
            lw=2.0,
            label="all: max",
        )
    ax.plot(
        merged["tokens"],
        finite_or_nan(merged["median"].to_numpy()),
        "k:",
        lw=2.0,
        label="all: median",
    )
    ax.axhline(eps, color="tab:red", ls="--", lw=1.0, label=f"EPS {eps:g}")
    ax.set_yscale("log")
    ax.set_xlabel("tokens collected (per shard)")
    ax.set_ylabel("1 − cos between records")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    p = Path(path)
    with atomic_output(p) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    log.info("wrote %s", p)
    return p


__all__ = ["plot_convergence", "shard_lines"]
