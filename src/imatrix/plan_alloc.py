"""Choosing one type per tensor: the least predicted KLD whose file fits the budget.

Why Lagrangian relaxation plus a greedy fill: the problem is a multiple-choice
knapsack (hundreds of tensors, a dozen types each). Relaxed with a price per byte,
each tensor independently takes the point of its lower convex hull of (bytes, cost)
that the price selects; walking all hull segments in order of falling
cost-saved-per-byte, and taking each that still fits, is the same as lowering the
price until the budget is spent. That leaves at most a segment's worth of bytes
unused, so a greedy fill then spends the rest on whichever single change saves the
most cost per byte until nothing fits. Ties are broken by tensor name and type id, so
the same inputs give the same recipe.

The relaxation can leave a few per cent of cost on the table when the budget cuts
through big tensors, so an exact dynamic programme over the budget in
:data:`DP_UNITS` steps (sizes rounded up, so its answer always fits) runs as well,
followed by the same fill; the cheaper of the two answers is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from imatrix.errors import ImatrixError

#: resolution of the dynamic programme: the room is cut into this many units
DP_UNITS = 50_000


@dataclass(frozen=True)
class Option:
    """One candidate type of one tensor: its padded bytes and its predicted cost."""

    qtype: int
    size: int
    cost: float


def _frontier(options: list[Option]) -> list[Option]:
    """Options no other option beats in both size and cost, by size (ties: type id)."""
    out: list[Option] = []
    for o in sorted(options, key=lambda o: (o.size, o.cost, o.qtype)):
        if not out or o.cost < out[-1].cost:
            out.append(o)
    return out


def _hull(front: list[Option]) -> list[Option]:
    """The lower convex hull of a frontier (cost-saved-per-byte falls along it)."""
    hull: list[Option] = []
    for o in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when it lies on or above the line from a to o
            if (b.cost - a.cost) * (o.size - a.size) >= (o.cost - a.cost) * (b.size - a.size):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def _slope(a: Option, b: Option) -> float:
    return (a.cost - b.cost) / (b.size - a.size)


def _relaxed(hulls: Mapping[str, list[Option]], pick: dict[str, Option], room: int) -> int:
    """Take hull segments by falling slope while they fit; returns the room left."""
    segs = []
    for name, h in hulls.items():
        for i in range(1, len(h)):
            segs.append((-_slope(h[i - 1], h[i]), name, i))
    segs.sort()
    blocked: set[str] = set()
    for _, name, i in segs:
        h = hulls[name]
        if name in blocked or pick[name] is not h[i - 1]:
            continue
        grow = h[i].size - h[i - 1].size
        if grow <= room:
            pick[name] = h[i]
            room -= grow
        else:
            blocked.add(name)
    return room


def _fill(fronts: Mapping[str, list[Option]], pick: dict[str, Option], room: int) -> int:
    """Spend the room left on the single changes saving most cost per byte."""
    while True:
        best: tuple[float, float, str, int] | None = None
        choice: tuple[str, Option] | None = None
        for name in sorted(fronts):
            cur = pick[name]
            for o in fronts[name]:
                grow = o.size - cur.size
                if grow <= 0 or grow > room or o.cost >= cur.cost:
                    continue
                key = (-(cur.cost - o.cost) / grow, -(cur.cost - o.cost), name, o.qtype)
                if best is None or key < best:
                    best, choice = key, (name, o)
        if choice is None:
            return room
        name, o = choice
        room -= o.size - pick[name].size
        pick[name] = o


def allocate(options: Mapping[str, list[Option]], budget: int) -> dict[str, Option]:
    """One option per tensor with total size <= ``budget`` and least total cost."""
    fronts = {n: _frontier(opts) for n, opts in sorted(options.items())}
    pick = {n: f[0] for n, f in fronts.items()}
    smallest = sum(o.size for o in pick.values())
    if smallest > budget:
        raise ImatrixError(
            f"budget too small: the smallest possible tensors need {smallest} bytes, "
            f"{smallest - budget} more than the budget leaves for them"
        )
    room = budget - smallest
    greedy = dict(pick)
    _fill(fronts, greedy, _relaxed({n: _hull(f) for n, f in fronts.items()}, greedy, room))
    exact = _dynamic(fronts, room)
    _fill(fronts, exact, budget - sum(o.size for o in exact.values()))
    cost_g = sum(o.cost for o in greedy.values())
    cost_e = sum(o.cost for o in exact.values())
    return exact if cost_e < cost_g else greedy


def _dynamic(fronts: Mapping[str, list[Option]], room: int) -> dict[str, Option]:
    """Exact choice over sizes rounded up to ``room / DP_UNITS`` bytes (fits for sure)."""
    unit = max(1, -(-room // DP_UNITS))
    n_units = room // unit
    best = np.zeros(n_units + 1)
    choice: list[np.ndarray] = []
    names = list(fronts)
    for name in names:
        f = fronts[name]
        base = f[0].size
        new = np.full(n_units + 1, np.inf)
        arg = np.zeros(n_units + 1, dtype=np.int16)
        for k, o in enumerate(f):
            u = -(-(o.size - base) // unit)
            if u > n_units:
                continue
            cand = np.full(n_units + 1, np.inf)
            cand[u:] = best[: n_units + 1 - u] + o.cost
            better = cand < new
            new[better] = cand[better]
            arg[better] = k
        best = new
        choice.append(arg)
    pick: dict[str, Option] = {}
    b = n_units
    for name, arg in zip(reversed(names), reversed(choice), strict=True):
        f = fronts[name]
        o = f[int(arg[b])]
        pick[name] = o
        b -= -(-(o.size - f[0].size) // unit)
    return dict(sorted(pick.items()))
