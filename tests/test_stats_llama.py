"""Our legacy statistics against what the real ``llama-imatrix --show-statistics`` prints.

The imatrices come from the real ``llama-imatrix`` run on the tiny dense and MoE models
(and a ``.dat`` conversion by the same tool, and a synthetic file with dead experts,
a tensor without data, zero channels and gaps between layers). Its table is parsed from
``--log-file`` (its logger can drop the end of the table at exit, so the run is
repeated until every row is there) and compared number by number: within the printed
precision or 1e-4 relative (llama.cpp sums in float32, we in float64).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from test_stats import small_imatrix

from imatrix.formats import read_imatrix, write_imatrix
from imatrix.stats import compute_statistics, render_statistics, split_name

CTX = 64
_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ [A-Z] ")

#: the legacy table's columns after (layer, tensor): (column, printed decimals)
TENSOR_FIELDS = (
    ("sum_sqact", 2),
    ("sqact_min", 4),
    ("sqact_max", 4),
    ("sqact_mean", 2),
    ("sqact_std", 2),
    ("active_pct", 2),
    ("elements", None),
    ("entropy", 4),
    ("entropy_norm_pct", 2),
    ("zd_pct", 2),
    ("cossim", 4),
)
LAYER_FIELDS = (("wmean_sum_sqact", 2), ("wmean_zd_pct", 4), ("wmean_cossim", 4))


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def parse_table(text: str) -> dict:
    """Structure and rows of a legacy statistics table (llama's log or ours)."""
    out: dict = {"lines": [], "tensors": [], "layers": []}
    section = None
    for raw in text.splitlines():
        line = _PREFIX.sub("", raw)
        if line.startswith("Computing statistics for"):
            section = "tensors"
        elif line.startswith("Computing weighted average statistics per layer"):
            section = "layers"
        fields = line.split("\t")
        # a row torn by llama's racing logger thread starts with part of a log prefix
        # ("001.624 I     0"): no layer name holds a space, so such a row is not taken
        torn = " " in fields[0].strip()
        if section == "tensors" and len(fields) == 13 and fields[8].strip().isdigit() and not torn:
            out["tensors"].append([f.strip().rstrip("%") for f in fields])
        elif section == "layers" and len(fields) == 4 and fields[0].strip().isdigit():
            out["layers"].append([f.strip().rstrip("%") for f in fields])
        elif section and line.strip():
            out["lines"].append(line)
    return out


#: llama-imatrix's logger thread is still writing when the process exits; on this
#: machine about one run in six gets the whole table out, each run takes ~10 ms.
ATTEMPTS = 400


def llama_statistics(
    llama_bin: Path, model: Path, imatrix: Path, n_rows: int, n_layers: int
) -> dict:
    """Run ``--show-statistics`` until the table parsed from the log file (or stderr)
    has every row."""
    log = imatrix.with_suffix(".stats.log")
    best = (0, 0)
    for _ in range(ATTEMPTS):
        log.unlink(missing_ok=True)
        proc = run(
            [
                str(llama_bin / "llama-imatrix"),
                "-m",
                str(model),
                "--in-file",
                str(imatrix),
                "-c",
                str(CTX),
                "--show-statistics",
                "--log-file",
                str(log),
            ]
        )
        for text in (log.read_text(encoding="utf-8"), proc.stderr):
            table = parse_table(text)
            got = (len(table["tensors"]), len(table["layers"]))
            if got == (n_rows, n_layers):
                return table
            best = max(best, got)
    raise AssertionError(
        f"llama-imatrix printed at most {best[0]}/{n_rows} tensor rows and "
        f"{best[1]}/{n_layers} layer rows in {ATTEMPTS} runs"
    )


def close(ours: float, printed: str, decimals: int | None) -> bool:
    if decimals is None:
        return int(ours) == int(printed)
    p = float(printed)
    return abs(ours - p) <= 0.5 * 10.0**-decimals + 1e-9 or abs(ours - p) <= 1e-4 * abs(p)


def assert_same_as_llama(data, source: str, table: dict) -> int:
    tensors, layers = compute_statistics(data)
    by_key = {
        split_name(n): r for n, r in zip(tensors["name"], tensors.to_dict("records"), strict=True)
    }
    compared = 0
    for fields in table["tensors"]:
        r = by_key[(fields[0], fields[1])]
        for (col, dec), printed in zip(TENSOR_FIELDS, fields[2:], strict=True):
            ours = 0.0 if pd.isna(r[col]) and col == "cossim" else float(r[col])
            assert close(ours, printed, dec), f"{r['name']} {col}: ours {ours!r}, llama {printed}"
            compared += 1
    lay = layers.set_index("layer")
    for fields in table["layers"]:
        r = lay.loc[int(fields[0])]
        for (col, dec), printed in zip(LAYER_FIELDS, fields[1:], strict=True):
            ours = 0.0 if pd.isna(r[col]) else float(r[col])
            assert close(ours, printed, dec), (
                f"layer {fields[0]} {col}: ours {ours!r}, llama {printed}"
            )
            compared += 1
    # our own table: same rows in the same order, same headings
    mine = parse_table(render_statistics(data, source, legacy=True))
    assert [f[:2] for f in mine["tensors"]] == [f[:2] for f in table["tensors"]]
    assert [f[0] for f in mine["layers"]] == [f[0] for f in table["layers"]]
    assert mine["lines"] == table["lines"]
    return compared


@pytest.fixture(scope="module")
def llama_imatrices(llama_bin, dense_model, moe_model, calib_text, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("llama-imatrix")
    out = {}
    for kind, model in (("dense", dense_model), ("moe", moe_model)):
        im = d / f"{kind}.gguf"
        run(
            [
                str(llama_bin / "llama-imatrix"),
                "-m", str(model), "-f", str(calib_text), "-o", str(im),
                "-c", str(CTX), "--chunks", "4", "--no-ppl", "-t", "2",
            ]
        )  # fmt: skip
        out[kind] = (model, im)
    return out


def _expected_rows(data) -> tuple[int, int]:
    t, lay = compute_statistics(data)
    return int((t["elements"] > 0).sum()), len(lay)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_legacy_columns_match_llama_imatrix(kind, llama_imatrices, llama_bin) -> None:
    model, im = llama_imatrices[kind]
    data = read_imatrix(im)
    n_rows, n_layers = _expected_rows(data)
    table = llama_statistics(llama_bin, model, im, n_rows, n_layers)
    compared = assert_same_as_llama(data, str(im), table)
    assert compared == n_rows * len(TENSOR_FIELDS) + n_layers * len(LAYER_FIELDS)
    if kind == "moe":
        assert any(f[1].endswith("_exps") for f in table["tensors"])


def test_legacy_dat_matches_llama_imatrix(llama_imatrices, llama_bin) -> None:
    """A ``.dat`` made by llama-imatrix: values scaled by -c on load, one count per entry."""
    model, im = llama_imatrices["moe"]
    dat = im.with_name("moe-legacy.dat")
    run(
        [
            str(llama_bin / "llama-imatrix"),
            "-m", str(model), "--in-file", str(im), "-c", str(CTX),
            "--output-format", "dat", "-o", str(dat),
        ]
    )  # fmt: skip
    data = read_imatrix(dat, chunk_size=CTX)
    assert data.is_legacy
    n_rows, n_layers = _expected_rows(data)
    table = llama_statistics(llama_bin, model, dat, n_rows, n_layers)
    assert assert_same_as_llama(data, str(dat), table) > 0


def test_edge_cases_match_llama_imatrix(tmp_path, llama_bin, dense_model) -> None:
    """Dead experts, a tensor without data, zero channels, a missing previous layer and a
    tensor outside the blocks, in a file llama-imatrix reads as its own."""
    src = tmp_path / "edge.gguf"
    write_imatrix(small_imatrix(with_sums=False), src, compat=True)
    data = read_imatrix(src)
    n_rows, n_layers = _expected_rows(data)
    assert n_rows == len(data.entries) - 1  # the all-zero tensor has no row
    table = llama_statistics(llama_bin, dense_model, src, n_rows, n_layers)
    assert_same_as_llama(data, str(src), table)
    rows = {(f[0], f[1]): f for f in table["tensors"]}
    assert ("1", "attn_k") not in rows and ("-", "output") in rows
    assert rows[("1", "ffn_up_exps")][8] == "16"  # N: the dead expert is left out
