"""``imatrix plan``: recipes that stock llama-quantize and ours turn into the planned file.

Every check runs the real tools (llama-imatrix for the imatrices, llama-quantize for
the files) on the tiny dense and MoE models: the recipe quantizes to byte-identical
files with both, each tensor gets the type its line names with no fallback, the file
has the predicted size to the byte, the ``--like`` budget is the stock file's size,
the error estimates agree with an independent numpy (de)quantization, planning is
deterministic, and bad input fails with one line and writes nothing.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from llamatools import llama_imatrix, run_tool
from tinymodels import TinySpec, write_tiny_model

from imatrix.cli import main
from imatrix.formats import load_means
from imatrix.plan_error import tensor_errors
from imatrix.plan_tensors import PlanTensor, tensor_group

CAL = ["--calibration-ctx", "128", "--calibration-chunks", "4", "-t", "2"]


@pytest.fixture(scope="module")
def imatrices(
    llama_bin: Path, models_dir: Path, dense_model: Path, moe_model: Path, calib_text: Path
) -> dict[str, Path]:
    out = {}
    for kind, model in (("dense", dense_model), ("moe", moe_model)):
        im = models_dir / f"plan-im-{kind}.gguf"
        if not im.exists():
            llama_imatrix(
                llama_bin,
                "-m",
                model,
                "-f",
                calib_text,
                "-o",
                im,
                "-c",
                "64",
                "--chunks",
                "4",
                "--no-ppl",
            )
        out[kind] = im
    return out


def run_plan(tmp: Path, model: Path, im: Path, cal: Path, *extra: str) -> tuple[int, Path]:
    recipe = tmp / "recipe.txt"
    rc = main(
        [
            "plan",
            "-m",
            str(model),
            "--imatrix",
            str(im),
            "-o",
            str(recipe),
            "--calibration-text",
            str(cal),
            *CAL,
            *extra,
        ]
    )
    return rc, recipe


@pytest.fixture(scope="module", params=["dense", "moe"])
def planned(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    dense_model: Path,
    moe_model: Path,
    imatrices: dict[str, Path],
    calib_text2: Path,
) -> tuple[Path, Path, Path, dict]:
    kind = request.param
    model = dense_model if kind == "dense" else moe_model
    tmp = tmp_path_factory.mktemp(f"plan-{kind}")
    rc, recipe = run_plan(tmp, model, imatrices[kind], calib_text2, "--like", "Q3_K_M")
    assert rc == 0
    car = json.loads(Path(f"{recipe}.json").read_text())
    return model, imatrices[kind], recipe, car


def tensor_types(path: Path) -> dict[str, int]:
    return {t.name: int(t.tensor_type) for t in GGUFReader(str(path)).tensors}


def test_recipe_gives_the_planned_file(planned, llama_bin: Path, tmp_path: Path) -> None:
    model, im, recipe, car = planned
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    proc = run_tool(
        llama_bin,
        "llama-quantize",
        "--imatrix",
        im,
        "--tensor-type-file",
        recipe,
        model,
        ref,
        car["ftype"],
    )
    assert "falling back" not in proc.stdout + proc.stderr
    assert "fallback" not in proc.stdout + proc.stderr
    assert (
        main(
            [
                "quantize",
                str(model),
                str(ours),
                car["ftype"],
                "--imatrix",
                str(im),
                "--tensor-type-file",
                str(recipe),
            ]
        )
        == 0
    )
    assert ref.read_bytes() == ours.read_bytes()
    assert ref.stat().st_size == car["predicted_size"] <= car["budget"]["bytes"]
    got = tensor_types(ref)
    tokens = recipe.read_text().split()
    assert tokens and all(re.fullmatch(r"\^[a-z0-9_.\\]+\$=[A-Z0-9_]+", t) for t in tokens)
    for tok in tokens:
        pat, qtype = tok.split("=")
        hits = [n for n in got if re.search(pat.lower(), n)]
        assert len(hits) == 1, tok
        assert got[hits[0]] == int(QT[qtype]), tok
    assert sum(car["types"].values()) == len(tokens)


def test_invocation_is_recorded(planned) -> None:
    model, im, recipe, car = planned
    assert car["invocation"]["llama-quantize"] == [
        "llama-quantize",
        "--imatrix",
        str(im),
        "--tensor-type-file",
        str(recipe),
        str(model),
        str(recipe.with_name("recipe.gguf")),
        "Q3_K_M",
    ]
    assert car["predicted_kld"] <= car["stock"]["predicted_kld"] + 1e-12
    assert len(car["model_sha256"]) == len(car["imatrix_sha256"]) == 64


def test_like_budget_is_the_stock_size(planned, tmp_path: Path) -> None:
    model, im, _recipe, car = planned
    stock = tmp_path / "stock.gguf"
    assert main(["quantize", str(model), str(stock), "Q3_K_M", "--imatrix", str(im)]) == 0
    assert stock.stat().st_size == car["budget"]["bytes"] == car["stock"]["size"]


def test_same_inputs_same_recipe(planned, tmp_path: Path, calib_text2: Path) -> None:
    model, im, recipe, _car = planned
    # a fresh cache: everything is measured again
    rc, again = run_plan(tmp_path, model, im, calib_text2, "--like", "Q3_K_M")
    assert rc == 0
    assert again.read_bytes() == recipe.read_bytes()


def _numpy_q8_0(x: np.ndarray) -> np.ndarray:
    b = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(b).max(axis=1)
    d = amax / 127
    idv = np.where(d > 0, 1.0 / np.where(d > 0, d, 1), 0).astype(np.float32)
    q = np.clip(np.round(b * idv[:, None]), -127, 127)
    return (q * d.astype(np.float16).astype(np.float32)[:, None]).reshape(x.shape)


def _numpy_q4_0(x: np.ndarray) -> np.ndarray:
    """quantize_row_q4_0_ref: d = signed absmax / -8, q = min(15, trunc(x/d + 8.5))."""
    b = x.reshape(-1, 32).astype(np.float32)
    i = np.abs(b).argmax(axis=1)
    mx = b[np.arange(b.shape[0]), i]
    d = (mx / -8).astype(np.float32)
    idv = np.where(d != 0, 1.0 / np.where(d != 0, d, 1), 0).astype(np.float32)
    q = np.minimum(15, np.trunc(b * idv[:, None] + np.float32(8.5)))
    return ((q - 8) * d.astype(np.float16).astype(np.float32)[:, None]).reshape(x.shape)


def _numpy_dequant_q4_0(raw: bytes, shape: tuple[int, int]) -> np.ndarray:
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 2:]
    lo, hi = (qs & 0x0F).astype(np.int8) - 8, (qs >> 4).astype(np.int8) - 8
    return (np.concatenate([lo, hi], axis=1) * d).reshape(shape)


def test_error_estimates_match_numpy(dense_model: Path, imatrices: dict[str, Path]) -> None:
    from imatrix.plan_error import quantize_rows
    from imatrix.plan_gguf import open_model

    model = open_model(str(dense_model))
    # the weights as gguf-py reads them: an independent check of our data offsets too
    reader = GGUFReader(str(dense_model))
    rts = {t.name: t for t in reader.tensors}
    means, _, _ = load_means(imatrices["dense"])
    for name, weighted in (("token_embd.weight", False), ("blk.0.ffn_down.weight", True)):
        rt = rts[name]
        ne = tuple(int(d) for d in rt.shape)
        t = PlanTensor(name, ne, QT(int(rt.tensor_type)), tensor_group(name), weighted)
        x = np.asarray(rt.data).reshape(-1, ne[0]).astype(np.float32)
        w = means[name].astype(np.float64) if weighted else np.ones(ne[0])
        got = tensor_errors(
            model,
            t,
            [int(QT.Q8_0), int(QT.Q4_0)],
            means.get(name) if weighted else None,
            max_elements=1 << 30,
        )
        q8 = _numpy_q8_0(x)
        assert got[int(QT.Q8_0)] == pytest.approx(float(((x - q8) ** 2 * w).sum()), rel=1e-9)
        if weighted:  # the imatrix path of quantize_q4_0: dequantize ggml's bytes in numpy
            raw = quantize_rows(int(QT.Q4_0), x, means[name])
            q4 = _numpy_dequant_q4_0(raw, x.shape)
        else:
            q4 = _numpy_q4_0(x)
        assert got[int(QT.Q4_0)] == pytest.approx(float(((x - q4) ** 2 * w).sum()), rel=1e-9)


@pytest.fixture(scope="module")
def narrow_model(llama_bin: Path, models_dir: Path, calib_text: Path) -> tuple[Path, Path]:
    """Rows 96 wide: no 256-block type (Q4_K, IQ2_XXS, ...) fits any tensor."""
    model = write_tiny_model(models_dir / "tiny-narrow.gguf", TinySpec(n_embd=96, n_ff=192), 5)
    im = models_dir / "plan-im-narrow.gguf"
    llama_imatrix(
        llama_bin, "-m", model, "-f", calib_text, "-o", im, "-c", "64", "--chunks", "2", "--no-ppl"
    )
    return model, im


@pytest.mark.parametrize("case", ["tiny-budget", "unknown-type", "other-imatrix", "no-tensor"])
def test_bad_input(
    case: str,
    tmp_path: Path,
    dense_model: Path,
    moe_model: Path,
    imatrices: dict[str, Path],
    narrow_model: tuple[Path, Path],
    calib_text2: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, im, extra = dense_model, imatrices["dense"], ["--like", "Q4_K_M"]
    if case == "tiny-budget":
        extra = ["--target-size", "100000"]
    elif case == "unknown-type":
        extra += ["--types", "Q4_K,Q9_9"]
    elif case == "other-imatrix":
        model = moe_model
    else:
        model, im = narrow_model
        extra = ["--like", "Q4_0", "--types", "Q4_0,Q4_K"]
    capsys.readouterr()
    rc, recipe = run_plan(tmp_path, model, im, calib_text2, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    errors = [line for line in err if line.startswith("imatrix plan: error:")]
    assert len(errors) == 1, err
    assert not recipe.exists() and not Path(f"{recipe}.json").exists()


def test_calibration_text_may_not_be_the_eval_text(
    tmp_path: Path,
    dense_model: Path,
    imatrices: dict[str, Path],
    calib_text2: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    copy = tmp_path / "held-out.txt"
    shutil.copy(calib_text2, copy)
    rc, recipe = run_plan(
        tmp_path,
        dense_model,
        imatrices["dense"],
        calib_text2,
        "--like",
        "Q4_K_M",
        "--eval-text",
        str(copy),
    )
    assert rc == 1
    assert "evaluation text" in capsys.readouterr().err
    assert not recipe.exists()


def test_second_budget_uses_the_cache(planned, tmp_path: Path, calib_text2: Path) -> None:
    model, im, recipe, car = planned
    cache = recipe.parent / "estimates.parquet"
    assert cache.exists()
    rc, other = run_plan(
        tmp_path, model, im, calib_text2, "--target-bpw", "5.0", "--cache", str(cache)
    )
    assert rc == 0
    car2 = json.loads(Path(f"{other}.json").read_text())
    assert car2["predicted_size"] <= car2["budget"]["bytes"]
    assert car2["sensitivities"] == car["sensitivities"]  # taken from the cache


def test_allocation_is_optimal_on_small_problems() -> None:
    """Against brute force: the least total cost whose size fits, on random instances."""
    import itertools

    from imatrix.plan_alloc import Option, allocate

    rng = np.random.default_rng(7)
    for _ in range(30):
        opts = {
            f"t{i}": [
                Option(q, int(s), float(c))
                for q, (s, c) in enumerate(
                    zip(
                        sorted(rng.integers(10, 100, 5)),
                        sorted(rng.random(5) * 10)[::-1],
                        strict=True,
                    )
                )
            ]
            for i in range(5)
        }
        budget = int(rng.integers(250, 450))
        pick = allocate(opts, budget)
        assert sum(o.size for o in pick.values()) <= budget
        best = min(
            sum(o.cost for o in combo)
            for combo in itertools.product(*opts.values())
            if sum(o.size for o in combo) <= budget
        )
        assert sum(o.cost for o in pick.values()) == pytest.approx(best)
        assert allocate(opts, budget) == pick
