"""Point labels that cover neither each other nor other points.

Why: a sweep of quants puts several points at one file size (a stock type, the same
type without the imatrix, a planned mix that came out as that type), and labels drawn
at a fixed offset then print over each other. Each label goes beside its point; when
that place is taken (by a label placed before it, by another point's marker, or it
would leave the axes) it tries the other side, then moves one line up or down at a
time, with a thin leader back to its point. The search is deterministic, so the same
data give the same picture; no layout library is needed for a dozen labels.

Call :func:`place_labels` after the figure's layout is final (``tight_layout``):
labels are placed in display coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backend_bases import RendererBase
from matplotlib.text import Annotation
from matplotlib.transforms import Bbox

#: label font size (points)
FONT_SIZE = 7.0
#: horizontal gap between a point and its label, and the label's lift above it (points)
GAP_PT = 5.0
LIFT_PT = 3.0
#: distance between two stacked labels (points): more than a line of FONT_SIZE text
LINE_PT = 1.4 * FONT_SIZE
#: half the side of the box a point's marker covers (points; markers of size 6)
MARKER_HALF_PT = 3.5
#: how many lines a label may move up or down looking for a free place
MAX_SHIFT_LINES = 4
#: width of the leader from a moved label to its point
LEADER_LW = 0.5
#: a label's background: lines and grid under it do not cross its letters
BACKGROUND = {"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8}


@dataclass(frozen=True)
class PointLabel:
    """A label for the point at ``(x, y)`` (data coordinates)."""

    x: float
    y: float
    text: str
    colour: str
    left_first: bool = False


def candidates(left_first: bool) -> list[tuple[int, int]]:
    """``(side, lines)`` places to try, nearest first: beside the point on the preferred
    side (-1 left, +1 right), then the other side, then one line up or down, and so on."""
    sides = (-1, 1) if left_first else (1, -1)
    out = [(side, 0) for side in sides]
    for k in range(1, MAX_SHIFT_LINES + 1):
        out += [(side, shift) for side in sides for shift in (k, -k)]
    return out


def _marker_box(ax: Axes, label: PointLabel, half_px: float) -> Bbox:
    x, y = ax.transData.transform((label.x, label.y))
    return Bbox.from_extents(x - half_px, y - half_px, x + half_px, y + half_px)


def _fits(box: Bbox, frame: Bbox, taken: Sequence[Bbox]) -> bool:
    inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0
    return inside and box.y1 <= frame.y1 and not any(box.overlaps(t) for t in taken)


def _settle(
    ann: Annotation, label: PointLabel, frame: Bbox, taken: Sequence[Bbox], r: RendererBase
) -> int:
    """Move ``ann`` to the first free place; returns its shift in lines. Where no place
    is free, the first place clear of other labels and points, else the preferred one."""
    places = candidates(label.left_first)
    fallback: tuple[int, int] | None = None
    for side, shift in places:
        _put(ann, side, shift)
        box = ann.get_window_extent(r)
        if _fits(box, frame, taken):
            return shift
        if fallback is None and not any(box.overlaps(t) for t in taken):
            fallback = (side, shift)
    side, shift = fallback or places[0]
    _put(ann, side, shift)
    return shift


def _put(ann: Annotation, side: int, shift: int) -> None:
    """Place ``ann`` on ``side`` of its point (-1 left, +1 right), ``shift`` lines up."""
    ann.xyann = (side * GAP_PT, LIFT_PT + shift * LINE_PT)
    ann.set_horizontalalignment("left" if side > 0 else "right")


def _annotate(
    ax: Axes,
    label: PointLabel,
    xytext: tuple[float, float] = (0.0, 0.0),
    ha: str = "left",
    arrowprops: dict[str, Any] | None = None,
) -> Annotation:
    return ax.annotate(
        label.text,
        (label.x, label.y),
        xytext=xytext,
        textcoords="offset points",
        ha=ha,
        fontsize=FONT_SIZE,
        color=label.colour,
        bbox=BACKGROUND,
        arrowprops=arrowprops,
    )


def place_labels(
    ax: Axes, labels: Sequence[PointLabel], renderer: RendererBase
) -> list[Annotation]:
    """Annotate every point of ``labels`` on ``ax``, in order, each where it covers no
    label placed before it and no other point."""
    frame = ax.get_window_extent(renderer)
    half = float(np.asarray(renderer.points_to_pixels(MARKER_HALF_PT)))
    markers = [_marker_box(ax, lab, half) for lab in labels]
    placed: list[Bbox] = []
    out = []
    for i, lab in enumerate(labels):
        ann = _annotate(ax, lab)
        taken = placed + markers[:i] + markers[i + 1 :]
        shift = _settle(ann, lab, frame, taken, renderer)
        placed.append(ann.get_window_extent(renderer))
        if shift:  # away from its point: a leader shows whose label it is
            pos = (float(ann.xyann[0]), float(ann.xyann[1]))
            ha = ann.get_horizontalalignment()
            ann.remove()
            leader = {"arrowstyle": "-", "lw": LEADER_LW, "color": lab.colour}
            ann = _annotate(ax, lab, xytext=pos, ha=ha, arrowprops=leader)
        out.append(ann)
    return out


__all__ = ["PointLabel", "candidates", "place_labels"]
