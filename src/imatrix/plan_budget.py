"""Budgets: the byte size a plan must not exceed, and the stock type it is compared with.

Why the whole file: users compare quants by the size of the file they download, and
the issue's `--like TYPE` means "as large as the stock TYPE quant of this model with
this imatrix", metadata included. `--target-bpw X` is X bits per parameter of the
whole file (X x parameters / 8 bytes, parameters = all tensors' elements),
`--target-size` a byte count. For `--target-*`, the ftype recorded with the recipe is
the largest stock type whose file fits the budget (found with llama.cpp's dry runs).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from imatrix.constants import GGMLQuantizationType
from imatrix.errors import ImatrixError
from imatrix.qtypes import parse_quant_type
from imatrix.quantize import PreparedImatrix

log = logging.getLogger(__name__)

#: stock mixes considered as the ftype of a `--target-*` plan (llama-quantize names)
STOCK_TYPES: tuple[str, ...] = (
    "IQ2_XXS",
    "IQ2_XS",
    "IQ2_S",
    "IQ2_M",
    "Q2_K_S",
    "Q2_K",
    "IQ3_XXS",
    "IQ3_XS",
    "IQ3_S",
    "IQ3_M",
    "Q3_K_S",
    "Q3_K_M",
    "Q3_K_L",
    "IQ4_XS",
    "IQ4_NL",
    "Q4_0",
    "Q4_1",
    "Q4_K_S",
    "Q4_K_M",
    "Q5_0",
    "Q5_1",
    "Q5_K_S",
    "Q5_K_M",
    "Q6_K",
    "Q8_0",
)
_NOT_A_MIX = {"F32", "F16", "BF16", "COPY"}


@dataclass(frozen=True)
class Budget:
    """Exactly one of the three."""

    like: str | None = None
    target_bpw: float | None = None
    target_size: int | None = None

    def check(self) -> None:
        given = [v for v in (self.like, self.target_bpw, self.target_size) if v is not None]
        if len(given) != 1:
            raise ImatrixError("give exactly one of --like, --target-bpw, --target-size")
        if self.like is not None:
            canon, _ = parse_quant_type(self.like)
            if canon in _NOT_A_MIX:
                raise ImatrixError(f"--like {self.like}: not a quantized type")
        if self.target_bpw is not None and not self.target_bpw > 0:
            raise ImatrixError(f"--target-bpw must be positive, got {self.target_bpw}")
        if self.target_size is not None and self.target_size <= 0:
            raise ImatrixError(f"--target-size must be positive, got {self.target_size}")

    def describe(self) -> dict[str, object]:
        if self.like is not None:
            return {"like": parse_quant_type(self.like)[0]}
        if self.target_bpw is not None:
            return {"target_bpw": self.target_bpw}
        return {"target_size": self.target_size}


StockTypes = dict[str, GGMLQuantizationType]
DryRun = Callable[[str], StockTypes]
SizeOf = Callable[[Mapping[str, GGMLQuantizationType]], int]


@dataclass(frozen=True)
class Resolved:
    """The budget in bytes, the ftype to pass, and that stock mix's per-tensor types."""

    bytes: int
    ftype: str
    stock: StockTypes
    stock_size: int


def resolve(budget: Budget, n_params: int, dry: DryRun, size_of: SizeOf) -> Resolved:
    """Turn a budget into bytes and pick its ftype (``dry`` runs llama.cpp's dry run)."""
    budget.check()
    if budget.like is not None:
        canon = parse_quant_type(budget.like)[0]
        stock = dry(canon)
        size = size_of(stock)
        return Resolved(size, canon, stock, size)
    limit = (
        int(budget.target_size)
        if budget.target_size is not None
        else int(float(budget.target_bpw or 0) * n_params // 8)
    )
    best: tuple[int, str, StockTypes] | None = None
    smallest: tuple[int, str, StockTypes] | None = None
    for name in STOCK_TYPES:
        stock = dry(name)
        size = size_of(stock)
        if size <= limit and (best is None or size > best[0]):
            best = (size, name, stock)
        if smallest is None or size < smallest[0]:
            smallest = (size, name, stock)
    assert smallest is not None
    chosen = best if best is not None else smallest
    log.info(
        "budget %d bytes; nearest stock type below it: %s (%d bytes)", limit, chosen[1], chosen[0]
    )
    return Resolved(limit, chosen[1], chosen[2], chosen[0])


def stock_dry_run(base: str | os.PathLike[str], imx: PreparedImatrix) -> DryRun:
    """A cached dry-run function for one model and imatrix."""
    from imatrix.plan_stock import dry_run

    memo: dict[str, StockTypes] = {}

    def run(name: str) -> StockTypes:
        if name not in memo:
            memo[name] = dry_run(base, name, imx)[0]
        return memo[name]

    return run


def used_types(stock: Mapping[str, GGMLQuantizationType], names: Sequence[str]) -> set[int]:
    """The types a stock mix gives the planned tensors."""
    return {int(stock[n]) for n in names if n in stock}
