"""Turning quantization errors into predicted KL divergence: one sensitivity per group.

Why a few real measurements: a squared error in ``ffn_down`` and the same error in
``token_embd`` do not cost the same KL divergence, and the weighted and unweighted
errors are on different scales. The model is additive:
``KLD(recipe) ~= sum over tensors of s[group] * error[tensor, type]``. Each group's
``s`` is measured once: a reference model with every tensor at a near-lossless type
(Q8_0 where it fits), and per group a probe with that group's tensors at a mid-size
type (Q4_0 where it fits) and the rest as in the reference; then
``s = (KLD(probe) - KLD(reference)) / (error(probe) - error(reference))``. The models are
made with the project's own ``quantize`` and compared with ``evaluate`` on the
calibration text; a group whose probe measured no more KLD than the reference (noise)
gets a small floor instead, so every error still costs something.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from imatrix.constants import GGMLQuantizationType as QT
from imatrix.plan_tensors import PlanTensor

log = logging.getLogger(__name__)

#: preferred types of the reference model and of the probes, first that fits
REFERENCE_TYPES = (QT.Q8_0, QT.Q6_K, QT.Q5_0)
PROBE_TYPES = (QT.Q4_0, QT.IQ4_NL, QT.Q4_K)
#: a noise-level probe gets this fraction of the reference's KLD, spread over the groups
NOISE_FLOOR = 0.1


@dataclass(frozen=True)
class CalibrationSettings:
    """How the sensitivities are measured (part of the cache key)."""

    n_ctx: int = 512
    chunks: int = 6
    threads: int | None = None


def _pick(errors: Mapping[int, float], prefs: Sequence[QT], lowest: bool) -> int:
    """The first preferred type among the tensor's candidates, else the candidate
    with the lowest (reference) or highest (probe) error."""
    for q in prefs:
        if int(q) in errors:
            return int(q)
    key = sorted(errors, key=lambda q: (errors[q], q))
    return key[0] if lowest else key[-1]


def probe_recipes(
    tensors: Sequence[PlanTensor], errors: Mapping[str, Mapping[int, float]]
) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """The reference recipe and, per group, its probe recipe (name -> ggml type)."""
    ref = {t.name: _pick(errors[t.name], REFERENCE_TYPES, True) for t in tensors}
    probes: dict[str, dict[str, int]] = {}
    for g in sorted({t.group for t in tensors}):
        rec = dict(ref)
        for t in tensors:
            if t.group == g:
                rec[t.name] = _pick(errors[t.name], PROBE_TYPES, False)
        if rec != ref:
            probes[g] = rec
    return ref, probes


def group_error(
    tensors: Sequence[PlanTensor],
    errors: Mapping[str, Mapping[int, float]],
    recipe: Mapping[str, int],
) -> dict[str, float]:
    """Sum of the tensors' errors per group under a recipe."""
    out: dict[str, float] = {}
    for t in tensors:
        out[t.group] = out.get(t.group, 0.0) + errors[t.name][recipe[t.name]]
    return out


def sensitivities(
    tensors: Sequence[PlanTensor],
    errors: Mapping[str, Mapping[int, float]],
    ref: Mapping[str, int],
    probes: Mapping[str, Mapping[str, int]],
    kld: Mapping[str, float],
) -> dict[str, float]:
    """Per group: KLD per unit of error (``kld`` holds "reference" and each probe group)."""
    e_ref = group_error(tensors, errors, ref)
    groups = sorted({t.group for t in tensors})
    floor_kld = NOISE_FLOOR * max(kld["reference"], 1e-12) / max(1, len(groups))
    out: dict[str, float] = {}
    for g in groups:
        if g not in probes:
            continue
        de = group_error(tensors, errors, probes[g])[g] - e_ref[g]
        dk = kld[g] - kld["reference"]
        if dk <= 0:
            log.info("calibration: group %s measured no KLD above the reference; floor used", g)
            dk = floor_kld
        out[g] = dk / de if de > 0 else 0.0
    # groups without a probe (nothing to vary) borrow the smallest measured sensitivity
    low = min((s for s in out.values() if s > 0), default=1.0)
    for g in groups:
        if out.get(g, 0.0) <= 0:
            out[g] = low
    return out


def measure(
    base: str | os.PathLike[str],
    imatrix: str,
    ftype: str,
    recipes: Mapping[str, Mapping[str, int]],
    text: str | os.PathLike[str],
    settings: CalibrationSettings,
) -> dict[str, float]:
    """Quantize each recipe (named) and measure its KLD mean against ``base`` on ``text``."""
    from tqdm import tqdm

    from imatrix.evaluate import evaluate
    from imatrix.plan_recipe import recipe_entries
    from imatrix.quantize import quantize

    names = list(recipes)
    with tempfile.TemporaryDirectory(prefix="imatrix-plan-") as tmp:
        paths = []
        for name in tqdm(names, desc="plan: calibration models", unit="model", disable=None):
            out = Path(tmp) / f"probe-{name}.gguf"
            quantize(
                base,
                out,
                ftype,
                imatrix=imatrix,
                threads=settings.threads,
                tensor_types=recipe_entries(recipes[name]),
            )
            paths.append(out)
        df = evaluate(
            base,
            paths,
            text,
            n_ctx=settings.n_ctx,
            chunks=settings.chunks,
            threads=settings.threads,
        )
    quant_rows = df[~df["is_base"]]
    return {n: float(k) for n, k in zip(names, quant_rows["kld_mean"], strict=True)}
