"""Planned quants in the workflow: the config's plans, their shared estimates, and the
quantization of a recipe.

Why one estimates step before the plans: the per-tensor error estimates and the
calibrated sensitivities are the slow part of a plan and the same for every budget,
and the planner caches them in one Parquet file. Several plan jobs running at once
must not write that file, so a step of its own computes everything every configured
budget needs (``results/{m}/plan/estimates.parquet``, a declared output), and each
plan job reads a private copy of it: no two jobs ever write one file, and a plan
finds every number it needs already there.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imatrix.errors import ImatrixError
from imatrix.qtypes import GGML_TYPE_NAMES, QUANT_TYPES

if TYPE_CHECKING:
    from imatrix.plan import PlanOptions
    from imatrix.plan_budget import Budget

log = logging.getLogger(__name__)

#: the keys of a plan that set its budget (exactly one per plan)
BUDGET_KEYS = ("like", "target_bpw", "target_size")


def _type_names() -> set[str]:
    """Every name llama.cpp gives a type (llama-quantize's and ggml's), upper case."""
    return {n.upper() for n in QUANT_TYPES} | {str(n).upper() for n in GGML_TYPE_NAMES.values()}


def check_plans(plans: Sequence[Mapping[str, Any]]) -> None:
    """Refuse plans without exactly one budget key, with a name that is a llama.cpp type
    name (its quant would be taken for the stock one) or a name used twice."""
    seen: set[str] = set()
    types = _type_names()
    for i, p in enumerate(plans):
        name = p.get("name")
        where = f"quantize.plans[{i}]" + (f" ({name})" if name else "")
        keys = [k for k in BUDGET_KEYS if p.get(k) is not None]
        if len(keys) != 1:
            raise ImatrixError(
                f"{where}: give exactly one of {', '.join(BUDGET_KEYS)} (got {keys or 'none'})"
            )
        if str(name).upper() in types:
            raise ImatrixError(f"{where}: plan name '{name}' is a llama.cpp type name")
        if str(name).lower() in seen:
            raise ImatrixError(f"{where}: plan name '{name}' is used twice")
        seen.add(str(name).lower())
        try:
            plan_budget(p).check()
        except ImatrixError as exc:
            raise ImatrixError(f"{where}: {exc}") from None


def plan_budget(p: Mapping[str, Any]) -> Budget:
    """The :class:`imatrix.plan.Budget` of one configured plan."""
    from imatrix.plan_budget import Budget

    return Budget(
        like=p.get("like"), target_bpw=p.get("target_bpw"), target_size=p.get("target_size")
    )


def plan_options(
    settings: Mapping[str, Any],
    calibration_texts: Sequence[str],
    eval_texts: Sequence[str],
    *,
    threads: int,
    cache: str | None = None,
    quant_output: str | None = None,
) -> PlanOptions:
    """:class:`imatrix.plan.PlanOptions` from the config's ``quantize.planner`` block."""
    from imatrix.plan import PlanOptions
    from imatrix.plan_calibrate import CalibrationSettings
    from imatrix.plan_tensors import DEFAULT_CANDIDATES

    return PlanOptions(
        types=tuple(settings.get("types") or DEFAULT_CANDIDATES),
        calibration_texts=tuple(calibration_texts),
        eval_texts=tuple(eval_texts),
        quant_output=quant_output,
        cache=cache,
        jobs=max(1, threads),
        sample_elements=int(settings["sample_elements"]),
        calibration=CalibrationSettings(
            n_ctx=int(settings["calibration_ctx"]),
            chunks=int(settings["calibration_chunks"]),
            threads=threads,
        ),
    )


def write_estimates(
    base: str,
    imatrix: str,
    plans: Sequence[Mapping[str, Any]],
    output: str,
    options: PlanOptions,
) -> Path:
    """Every estimate and sensitivity the ``plans`` of one model need, into ``output``."""
    from imatrix.plan import prepare_estimates

    return prepare_estimates(base, imatrix, [plan_budget(p) for p in plans], output, options)


def plan_recipe(
    base: str,
    imatrix: str,
    estimates: str,
    plan: Mapping[str, Any],
    output: str,
    options: PlanOptions,
) -> Path:
    """Plan one recipe, reading the estimates from a private copy of ``estimates`` (the
    planner writes its cache when it computes something; this job must not write
    another job's output)."""
    from dataclasses import replace

    from imatrix.plan import plan as make_plan

    with tempfile.TemporaryDirectory(prefix="imatrix-plan-cache-") as tmp:
        cache = Path(tmp) / "estimates.parquet"
        shutil.copyfile(estimates, cache)
        make_plan(base, imatrix, plan_budget(plan), output, replace(options, cache=str(cache)))
    return Path(output)


def read_sidecar(recipe: str | Path) -> dict[str, Any]:
    """The ``.json`` beside a recipe (ftype, budget, predictions, invocation)."""
    from imatrix.plan_recipe import sidecar_path

    path = sidecar_path(str(recipe))
    try:
        car: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ImatrixError(f"{path}: no such file (the sidecar of recipe {recipe})") from None
    except (OSError, ValueError) as exc:
        raise ImatrixError(f"{path}: not a readable plan sidecar: {exc}") from None
    for key in ("ftype", "imatrix", "predicted_size", "budget"):
        if key not in car:
            raise ImatrixError(f"{path}: plan sidecar lacks '{key}'")
    return car


def quantize_recipe(
    base: str,
    imatrix: str,
    recipe: str,
    output: str,
    *,
    threads: int,
    allow_requantize: bool = False,
) -> Path:
    """Quantize ``base`` with a recipe and the ftype its sidecar names, as the sidecar's
    invocation does; refuse a file above the budget (a planner bug: it is removed)."""
    from imatrix.quantize import quantize, read_tensor_type_file

    car = read_sidecar(recipe)
    if car["imatrix"] != imatrix:
        raise ImatrixError(
            f"{recipe}: planned with the imatrix '{car['imatrix']}', not '{imatrix}' "
            "(the path is recorded in the file, so the predicted size would not hold)"
        )
    out = quantize(
        base,
        output,
        car["ftype"],
        imatrix=imatrix,
        threads=threads,
        allow_requantize=allow_requantize,
        tensor_types=read_tensor_type_file(recipe),
    )
    size = out.stat().st_size
    if size > int(car["budget"]["bytes"]):
        out.unlink()
        raise ImatrixError(
            f"{out}: {size} bytes exceed the plan's budget of {car['budget']['bytes']}"
        )
    if size != int(car["predicted_size"]):
        log.warning("%s: %d bytes, the plan predicted %d", out, size, car["predicted_size"])
    return out
