"""Benchmark of ``imatrix plan`` (issue 12, "Proof required").

For each budget (default: ``--like`` Q2_K, IQ3_XXS, Q4_K_M and ``--target-bpw`` 5.0, 5.5,
6.0) it plans a recipe (timed: the first plan fills the estimate cache, the later ones
reuse it), quantizes it, and compares it on the held-out text with two baselines that
fit the same budget: the stock mix (for ``--like``) and the best simple hand recipe
(``--pure`` blocks of one type plus ``--token-embedding-type``, each from Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0, IQ4_NL; the ``--hand`` largest that fit are measured, the lowest KLD
kept). Then ``--random`` random recipes with sizes within +-10 % of the budgets give
the Spearman rank correlation of predicted against measured KLD. Prints a Markdown
table and writes everything to ``WORKDIR/plan-benchmark.json``.

    python benchmarks/plan.py -m BASE-F16.gguf --imatrix imatrix.gguf \
        --eval-text heldout.txt --calibration-text calib.txt -w /tmp/planbench
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from gguf import GGMLQuantizationType as QT

from imatrix.evaluate import evaluate
from imatrix.plan import (
    Budget,
    PlanOptions,
    candidate_types,
    costs,
    open_planning,
    options_for,
    plan,
    predicted_kld,
)
from imatrix.plan_calibrate import CalibrationSettings
from imatrix.plan_recipe import recipe_entries
from imatrix.plan_tensors import DEFAULT_CANDIDATES
from imatrix.quantize import quantize

log = logging.getLogger("benchmarks.plan")

BUDGETS = ["like:Q2_K", "like:IQ3_XXS", "like:Q4_K_M", "bpw:5.0", "bpw:5.5", "bpw:6.0"]
HAND_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"]


def parse_budget(text: str) -> Budget:
    kind, _, value = text.partition(":")
    return Budget(like=value) if kind == "like" else Budget(target_bpw=float(value))


def hand_recipes(p: Any, budget: int, n: int) -> list[tuple[str, str, int]]:
    """The ``n`` largest (blocks, embedding) hand recipes whose file fits ``budget``."""
    out = []
    for blocks, embd in itertools.product(HAND_TYPES, HAND_TYPES):
        types = {
            t.name: int(QT[embd] if t.group == "token_embd" else QT[blocks]) for t in p.tensors
        }
        size = p.sizes.file_size(p.tensors, types)
        if size <= budget:
            out.append((blocks, embd, size))
    return sorted(out, key=lambda r: -r[2])[:n]


def random_recipes(
    p: Any, opts: dict[str, list[int]], budgets: list[int], n: int, seed: int
) -> list[dict[str, int]]:
    """Random per-tensor types with file sizes within +-10 % of a (random) budget."""
    rng = np.random.default_rng(seed)
    by_size = {
        t.name: sorted(opts[t.name], key=lambda q: p.sizes.file_size([t], {t.name: q}))
        for t in p.tensors
    }
    out: list[dict[str, int]] = []
    for _ in range(200 * n):
        if len(out) == n:
            break
        b = budgets[rng.integers(len(budgets))]
        centre = rng.random()
        types = {}
        for name, qs in by_size.items():
            k = int(np.clip(round((centre + rng.normal(0, 0.25)) * (len(qs) - 1)), 0, len(qs) - 1))
            types[name] = qs[k]
        size = p.sizes.file_size(p.tensors, types)
        if abs(size - b) <= 0.1 * b:
            out.append(types)
    return out


def measure(base: str, paths: list[Path], text: str, args: argparse.Namespace) -> pd.DataFrame:
    df = evaluate(base, paths, text, n_ctx=args.ctx, chunks=args.chunks, threads=args.threads)
    return df[~df["is_base"]].reset_index(drop=True)


def row(label: str, r: pd.Series) -> dict[str, Any]:
    return {
        "model": label,
        "size": int(r["file_size"]),
        "kld": float(r["kld_mean"]),
        "kld_lo": float(r["kld_mean"] - 1.96 * r["kld_err"]),
        "kld_hi": float(r["kld_mean"] + 1.96 * r["kld_err"]),
        "same_top_p": float(r["same_top_p"]),
    }


def one_budget(spec: str, args: argparse.Namespace, po: PlanOptions, w: Path) -> dict[str, Any]:
    recipe = w / f"plan-{spec.replace(':', '-')}.txt"
    t0 = time.perf_counter()
    res = plan(args.model, args.imatrix, parse_budget(spec), recipe, po)
    seconds = time.perf_counter() - t0
    car = res.sidecar
    models: list[tuple[str, Path]] = []
    out = w / f"{recipe.stem}.gguf"
    quantize(
        args.model,
        out,
        car["ftype"],
        imatrix=args.imatrix,
        tensor_types=recipe.read_text().split(),
        threads=args.threads,
    )
    models.append(("plan", out))
    if spec.startswith("like:"):
        stock = w / f"stock-{car['ftype']}.gguf"
        if not stock.exists():
            quantize(args.model, stock, car["ftype"], imatrix=args.imatrix, threads=args.threads)
        models.append((f"stock {car['ftype']}", stock))
    p = open_planning(args.model, args.imatrix, po)
    for blocks, embd, _ in hand_recipes(p, car["budget"]["bytes"], args.hand):
        h = w / f"hand-{blocks}-{embd}.gguf"
        if not h.exists():
            quantize(
                args.model,
                h,
                blocks,
                imatrix=args.imatrix,
                pure=True,
                token_embedding_type=embd,
                threads=args.threads,
            )
        models.append((f"hand {blocks}+embd {embd}", h))
    df = measure(args.model, [m for _, m in models], args.eval_text, args)
    rows = [row(label, df.iloc[i]) for i, (label, _) in enumerate(models)]
    hands = [r for r in rows if r["model"].startswith("hand")]
    return {
        "budget": spec,
        "bytes": car["budget"]["bytes"],
        "plan_seconds": seconds,
        "predicted_kld": car["predicted_kld"],
        "rows": rows,
        "best_hand": min(hands, key=lambda r: r["kld"]) if hands else None,
    }


def spearman(
    args: argparse.Namespace, po: PlanOptions, w: Path, budgets: list[int]
) -> dict[str, Any]:
    p = open_planning(args.model, args.imatrix, po)
    opts = options_for(p.tensors, candidate_types(po.types), {})
    errors, sens = costs(p, opts, po, po.cache or w / "estimates.parquet")
    recipes = random_recipes(p, opts, budgets, args.random, seed=12)
    paths, pred = [], []
    for i, types in enumerate(recipes):
        out = w / f"random-{i:02d}.gguf"
        quantize(
            args.model,
            out,
            "Q8_0",
            imatrix=args.imatrix,
            tensor_types=recipe_entries(types),
            threads=args.threads,
        )
        paths.append(out)
        pred.append(predicted_kld(p.tensors, errors, sens, types))
    df = measure(args.model, paths, args.eval_text, args)
    # Spearman = Pearson of the ranks (no scipy needed)
    rho = pd.Series(pred).rank().corr(pd.Series(df["kld_mean"].to_numpy()).rank())
    return {
        "n": len(recipes),
        "spearman": float(rho),
        "predicted": pred,
        "measured": df["kld_mean"].tolist(),
        "sizes": df["file_size"].tolist(),
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| budget | bytes | model | size | KLD mean [95% CI] | same top p | plan s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for x in r["rows"]:
            lines.append(
                f"| {r['budget']} | {r['bytes']:,} | {x['model']} | {x['size']:,} | "
                f"{x['kld']:.5f} [{x['kld_lo']:.5f}, {x['kld_hi']:.5f}] | "
                f"{x['same_top_p']:.4f} | {r['plan_seconds']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--imatrix", required=True)
    ap.add_argument("--eval-text", required=True)
    ap.add_argument("--calibration-text", action="append", default=[])
    ap.add_argument("-w", "--workdir", required=True)
    ap.add_argument("--budgets", default=",".join(BUDGETS))
    ap.add_argument("--random", type=int, default=20)
    ap.add_argument("--hand", type=int, default=3, help="largest fitting hand recipes measured")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=None)
    ap.add_argument("--calibration-chunks", type=int, default=6)
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("-t", "--threads", type=int, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname).1s %(name)s: %(message)s")
    w = Path(args.workdir)
    w.mkdir(parents=True, exist_ok=True)
    po = PlanOptions(
        types=DEFAULT_CANDIDATES,
        calibration_texts=tuple(args.calibration_text),
        eval_texts=(args.eval_text,),
        jobs=args.jobs,
        cache=str(w / "estimates.parquet"),
        calibration=CalibrationSettings(chunks=args.calibration_chunks, threads=args.threads),
    )
    out = w / "plan-benchmark.json"
    results: list[dict[str, Any]] = []
    corr = None
    for spec in (s for s in args.budgets.split(",") if s):
        results.append(one_budget(spec, args, po, w))
        # after each step: a long run that is stopped keeps what it measured
        out.write_text(json.dumps({"budgets": results, "random": corr}, indent=2) + "\n")
    if args.random:
        corr = spearman(args, po, w, [r["bytes"] for r in results])
        out.write_text(json.dumps({"budgets": results, "random": corr}, indent=2) + "\n")
    print(table(results))
    if corr is not None:
        print(
            f"\nSpearman predicted vs measured KLD over {corr['n']} random recipes: "
            f"{corr['spearman']:.3f}"
        )


if __name__ == "__main__":
    main()
