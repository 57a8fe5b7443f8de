"""``imatrix plan``: the per-tensor type mix with the least predicted KLD for a file size.

Why these steps (docs/plan.md has the method and its reasoning): the tensors and
their candidate types follow llama.cpp's own rules (:mod:`imatrix.plan_tensors`); the
budget and the stock mix come from llama.cpp's dry run (:mod:`imatrix.plan_budget`,
:mod:`imatrix.plan_stock`) and the exact file-size model (:mod:`imatrix.plan_size`);
per tensor and type an error measured with ggml's kernels (:mod:`imatrix.plan_error`)
becomes predicted KLD through calibrated per-group sensitivities
(:mod:`imatrix.plan_calibrate`); the allocation (:mod:`imatrix.plan_alloc`) picks the
mix; before anything is written, llama.cpp's dry run of the recipe must give every
tensor its planned type without a fallback. Estimates and sensitivities are cached
(:mod:`imatrix.plan_cache`), so another budget for the same model takes seconds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from imatrix.constants import GGMLQuantizationType
from imatrix.errors import ImatrixError
from imatrix.hashing import sha256_file
from imatrix.plan_alloc import Option, allocate
from imatrix.plan_budget import Budget, resolve, stock_dry_run
from imatrix.plan_cache import KIND_ERROR, KIND_SENSITIVITY, PlanCache, cache_key
from imatrix.plan_calibrate import CalibrationSettings
from imatrix.plan_error import DEFAULT_SAMPLE_ELEMENTS
from imatrix.plan_gguf import ModelFile, open_model
from imatrix.plan_inputs import candidate_types, check_candidates, load_tensors, options_for
from imatrix.plan_recipe import recipe_entries, sidecar_path, write_recipe
from imatrix.plan_size import SizeModel, padded_bytes, size_model
from imatrix.plan_tensors import DEFAULT_CANDIDATES, PlanTensor
from imatrix.quantize import PreparedImatrix, prepare_imatrix

__all__ = [
    "Budget",
    "PlanOptions",
    "PlanResult",
    "candidate_types",
    "costs",
    "open_planning",
    "options_for",
    "plan",
    "predicted_kld",
    "prepare_estimates",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlanOptions:
    """Everything but the model, imatrix, budget and output."""

    types: Sequence[str] = DEFAULT_CANDIDATES
    calibration_texts: Sequence[str] = ()
    eval_texts: Sequence[str] = ()
    quant_output: str | None = None
    cache: str | None = None
    jobs: int = 1
    sample_elements: int = DEFAULT_SAMPLE_ELEMENTS
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)


@dataclass
class PlanResult:
    """The recipe (tensor name -> ggml type id), its predictions and its sidecar."""

    types: dict[str, int]
    predicted_size: int
    predicted_kld: float
    sidecar: dict[str, Any]


def check_budget(p: Planning, opts: Mapping[str, Sequence[int]], budget: int) -> None:
    """Refuse a budget below the smallest file the candidates can make (before any work)."""
    smallest = p.sizes.file_size(
        p.tensors, {t.name: min(opts[t.name], key=lambda q: padded_bytes(t, q)) for t in p.tensors}
    )
    if smallest > budget:
        raise ImatrixError(
            f"budget of {budget} bytes is below the smallest file the candidate types can "
            f"make of {p.base} ({smallest} bytes)"
        )


def estimate(
    tensors: Sequence[PlanTensor],
    model: ModelFile,
    opts: Mapping[str, Sequence[int]],
    imx: PreparedImatrix,
    cache: PlanCache,
    key: str,
    po: PlanOptions,
) -> dict[str, dict[int, float]]:
    """Errors of every (tensor, option), computing only what the cache lacks."""
    from imatrix.plan_error import all_errors

    have = cache.values(key, KIND_ERROR)
    name_of = {int(q): q.name for q in GGMLQuantizationType}
    need = {t.name: [q for q in opts[t.name] if (t.name, name_of[q]) not in have] for t in tensors}
    todo = [t for t in tensors if need[t.name]]
    if todo:
        fresh = all_errors(todo, model, need, imx.means, po.sample_elements, po.jobs)
        cache.update(
            key,
            KIND_ERROR,
            {(n, name_of[q]): e for n, d in fresh.items() for q, e in d.items()},
        )
        cache.save()
        have = cache.values(key, KIND_ERROR)
    return {t.name: {q: have[(t.name, name_of[q])] for q in opts[t.name]} for t in tensors}


def _check_not_eval(texts: Sequence[str], eval_texts: Sequence[str]) -> None:
    held_out = {sha256_file(p): p for p in eval_texts}
    for p in texts:
        h = sha256_file(p)
        if h in held_out:
            raise ImatrixError(
                f"{p}: calibration text is the evaluation text {held_out[h]} (same sha256); "
                "calibrating on held-out text would flatter the plan"
            )


def default_calibration_texts(imx: PreparedImatrix) -> list[str]:
    """The imatrix's datasets (llama-imatrix records the text files it read)."""
    found = [d for d in imx.datasets if Path(d).is_file()]
    if not found:
        raise ImatrixError(
            f"{imx.path}: its datasets ({', '.join(imx.datasets) or 'none recorded'}) are "
            "not readable files here; give --calibration-text"
        )
    return found


def calibration_text(texts: Sequence[str], workdir: Path) -> str:
    """One text file (the texts concatenated when several)."""
    if len(texts) == 1:
        return texts[0]
    p = workdir / "calibration.txt"
    p.write_text("\n".join(Path(t).read_text(encoding="utf-8") for t in texts), encoding="utf-8")
    return str(p)


def sensitivities(
    base: str,
    imatrix: str,
    tensors: Sequence[PlanTensor],
    errors: Mapping[str, Mapping[int, float]],
    cache: PlanCache,
    key: str,
    po: PlanOptions,
    imx: PreparedImatrix,
) -> dict[str, float]:
    """Calibrated sensitivities (cached per calibration text and settings)."""
    import tempfile

    from imatrix import plan_calibrate as pc

    texts = list(po.calibration_texts) or default_calibration_texts(imx)
    _check_not_eval(texts, po.eval_texts)
    s = po.calibration
    ckey = cache_key(est=key, texts=[sha256_file(t) for t in texts], n_ctx=s.n_ctx, chunks=s.chunks)
    have = cache.values(ckey, KIND_SENSITIVITY)
    groups = sorted({t.group for t in tensors})
    if all((g, "") in have for g in groups):
        return {g: have[(g, "")] for g in groups}
    ref, probes = pc.probe_recipes(tensors, errors)
    with tempfile.TemporaryDirectory(prefix="imatrix-plan-text-") as tmp:
        text = calibration_text(texts, Path(tmp))
        kld = pc.measure(base, imatrix, "Q8_0", {"reference": ref, **probes}, text, s)
    sens = pc.sensitivities(tensors, errors, ref, probes, kld)
    log.info("calibration: KLD %s; sensitivities %s", kld, sens)
    cache.update(ckey, KIND_SENSITIVITY, {(g, ""): v for g, v in sens.items()})
    cache.save()
    return sens


def _option_table(
    tensors: Sequence[PlanTensor],
    errors: Mapping[str, Mapping[int, float]],
    sens: Mapping[str, float],
) -> dict[str, list[Option]]:
    return {
        t.name: [
            Option(q, padded_bytes(t, q), sens[t.group] * e)
            for q, e in sorted(errors[t.name].items())
        ]
        for t in tensors
    }


def predicted_kld(
    tensors: Sequence[PlanTensor],
    errors: Mapping[str, Mapping[int, float]],
    sens: Mapping[str, float],
    types: Mapping[str, int],
) -> float:
    """The additive model's KLD of a recipe (see :mod:`imatrix.plan_calibrate`)."""
    return float(sum(sens[t.group] * errors[t.name][types[t.name]] for t in tensors))


def verify(base: str, ftype: str, imx: PreparedImatrix, types: Mapping[str, int]) -> None:
    """llama.cpp's dry run of the recipe gives each tensor its type, with no fallback."""
    from imatrix.plan_stock import dry_run
    from imatrix.quantize import parse_tensor_type

    got, fallbacks = dry_run(
        base, ftype, imx, [parse_tensor_type(e) for e in recipe_entries(types)]
    )
    wrong = sorted(n for n, q in types.items() if int(got.get(n, -1)) != q)
    if wrong or fallbacks:
        raise ImatrixError(
            f"{base}: llama.cpp's dry run of the recipe disagrees with the plan "
            f"({len(wrong)} tensor(s), e.g. {wrong[:1]}; {fallbacks} fallback line(s))"
        )


@dataclass
class Planning:
    """A model and imatrix opened for planning."""

    base: str
    imatrix: str
    imx: PreparedImatrix
    model: ModelFile
    tensors: list[PlanTensor]
    sizes: SizeModel
    n_params: int
    model_sha256: str
    imatrix_sha256: str


def open_planning(
    base: str | os.PathLike[str], imatrix: str | os.PathLike[str], po: PlanOptions
) -> Planning:
    """Read the model's tensor list and the imatrix, and check that they belong together."""
    base_s, imx_s = os.fspath(base), os.fspath(imatrix)
    if not Path(base_s).is_file():
        raise ImatrixError(f"{base_s}: no such model file")
    cands = candidate_types(po.types)
    imx = prepare_imatrix(imx_s)
    if not imx.means:
        raise ImatrixError(f"{imx_s}: the imatrix has no entries")
    model = open_model(base_s)
    tensors = load_tensors(model, imx)
    check_candidates(tensors, cands)
    sm = size_model(model, tensors, imx.kv_overrides())
    n_params = sum(t.n_elements for t in model.tensors)
    return Planning(
        base_s, imx_s, imx, model, tensors, sm, n_params, sha256_file(base_s), sha256_file(imx_s)
    )


def costs(
    p: Planning, opts: Mapping[str, Sequence[int]], po: PlanOptions, cache_path: str | Path
) -> tuple[dict[str, dict[int, float]], dict[str, float]]:
    """Errors per (tensor, option) and the calibrated sensitivities, through the cache."""
    key = cache_key(model=p.model_sha256, imatrix=p.imatrix_sha256, sample=po.sample_elements)
    cache = PlanCache.load(cache_path)
    errors = estimate(p.tensors, p.model, opts, p.imx, cache, key, po)
    sens = sensitivities(p.base, p.imatrix, p.tensors, errors, cache, key, po, p.imx)
    return errors, sens


def prepare_estimates(
    base: str | os.PathLike[str],
    imatrix: str | os.PathLike[str],
    budgets: Sequence[Budget],
    cache: str | os.PathLike[str],
    options: PlanOptions | None = None,
) -> Path:
    """Compute into ``cache`` every error estimate and sensitivity the plans of
    ``budgets`` need, so that those plans only read it (the workflow runs this once per
    model, then its plans in parallel, none of which writes the file)."""
    po = options or PlanOptions()
    for budget in budgets:
        budget.check()
    p = open_planning(base, imatrix, po)
    cands = candidate_types(po.types)
    dry = stock_dry_run(p.base, p.imx)
    needed: dict[str, list[int]] = {t.name: [] for t in p.tensors}
    todo: list[Budget | None] = [*budgets] or [None]  # no budget: the candidates only
    for b in todo:
        stock = (
            {}
            if b is None
            else resolve(b, p.n_params, dry, partial(_size, p.sizes, p.tensors)).stock
        )
        for name, qs in options_for(p.tensors, cands, stock).items():
            needed[name] += [q for q in qs if q not in needed[name]]
    costs(p, needed, po, Path(cache))  # computes and saves what the file lacks
    return Path(cache)


def plan(
    base: str | os.PathLike[str],
    imatrix: str | os.PathLike[str],
    budget: Budget,
    output: str | os.PathLike[str],
    options: PlanOptions | None = None,
) -> PlanResult:
    """Plan a recipe for ``base`` under ``budget`` and write it to ``output`` (+ ``.json``).

    Nothing is written when the plan fails (:class:`ImatrixError`), except the estimate
    cache. ``imatrix`` is recorded as given: the invocation in the sidecar uses the same
    string, and the predicted size holds for it.
    """
    po = options or PlanOptions()
    budget.check()
    out_s = os.fspath(output)
    parent = Path(out_s).parent
    if not parent.is_dir():
        raise ImatrixError(f"{out_s}: output directory {parent} does not exist")
    p = open_planning(base, imatrix, po)
    res = resolve(
        budget, p.n_params, stock_dry_run(p.base, p.imx), lambda st: _size(p.sizes, p.tensors, st)
    )
    opts = options_for(p.tensors, candidate_types(po.types), res.stock)
    check_budget(p, opts, res.bytes)
    errors, sens = costs(p, opts, po, po.cache or Path(out_s).parent / "estimates.parquet")
    pick = allocate(
        _option_table(p.tensors, errors, sens), res.bytes - p.sizes.meta - p.sizes.fixed
    )
    types = {n: o.qtype for n, o in pick.items()}
    verify(p.base, res.ftype, p.imx, types)
    size = p.sizes.file_size(p.tensors, types)
    if size > res.bytes:  # the allocation guarantees this; a failure is a bug
        raise ImatrixError(f"internal error: planned {size} bytes exceed the budget {res.bytes}")
    kld = predicted_kld(p.tensors, errors, sens, types)
    stock_types = {t.name: int(res.stock[t.name]) for t in p.tensors}
    car = {
        "model": p.base,
        "model_sha256": p.model_sha256,
        "imatrix": p.imatrix,
        "imatrix_sha256": p.imatrix_sha256,
        "budget": {**budget.describe(), "bytes": res.bytes},
        "ftype": res.ftype,
        "stock": {
            "type": res.ftype,
            "size": res.stock_size,
            "predicted_kld": predicted_kld(p.tensors, errors, sens, stock_types),
        },
        "invocation": _invocation(p.base, p.imatrix, out_s, res.ftype, po),
        "predicted_size": size,
        "predicted_kld": kld,
        "n_params": p.n_params,
        "sensitivities": dict(sorted(sens.items())),
        "types": _histogram(types),
        "calibration": {"n_ctx": po.calibration.n_ctx, "chunks": po.calibration.chunks},
        "sample_elements": po.sample_elements,
    }
    write_recipe(out_s, types, car)
    log.info("wrote %s and %s: %d bytes, predicted KLD %.5f", out_s, sidecar_path(out_s), size, kld)
    return PlanResult(types, size, kld, car)


def _size(sm: SizeModel, tensors: Sequence[PlanTensor], stock: Mapping[str, Any]) -> int:
    return sm.file_size(tensors, {t.name: int(stock[t.name]) for t in tensors})


def _histogram(types: Mapping[str, int]) -> dict[str, int]:
    names, counts = np.unique(
        [GGMLQuantizationType(q).name for q in types.values()], return_counts=True
    )
    return {str(n): int(c) for n, c in zip(names, counts, strict=True)}


def default_quant_output(recipe: str) -> str:
    p = Path(recipe)
    return str(p.with_name(p.stem + ".gguf"))


def _invocation(
    base: str, imx: str, recipe: str, ftype: str, po: PlanOptions
) -> dict[str, list[str]]:
    out = po.quant_output or default_quant_output(recipe)
    return {
        "llama-quantize": [
            "llama-quantize",
            "--imatrix",
            imx,
            "--tensor-type-file",
            recipe,
            base,
            out,
            ftype,
        ],
        "imatrix": [
            "imatrix",
            "quantize",
            base,
            out,
            ftype,
            "--imatrix",
            imx,
            "--tensor-type-file",
            recipe,
        ],
    }
