"""Plots: real PNGs with the content they claim (grey for missing cells, red crosses for
dead experts), written atomically, and the CLI options that make them."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread
from test_stats import small_imatrix

from imatrix.cli import main
from imatrix.errors import ImatrixError
from imatrix.formats import write_imatrix
from imatrix.model import Entry, ImatrixData
from imatrix.plots import (
    DEFAULT_STATISTICS,
    PREFERRED_STATISTICS,
    plot_comparison,
    plot_expert_counts,
    plot_layer_heatmap,
    write_plots,
)
from imatrix.stats import compare_imatrices, compute_statistics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def pixels(path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    return img[..., :3]


def n_grey(img: np.ndarray) -> int:
    """Pixels of the colour of missing cells (#d0d0d0)."""
    return int(np.count_nonzero(np.all(np.abs(img - 0xD0 / 255) < 0.01, axis=-1)))


def n_red(img: np.ndarray) -> int:
    """Pixels of the pure red of the never-fired markers."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return int(np.count_nonzero((r > 0.9) & (g < 0.15) & (b < 0.15)))


def full_grid(dead: bool) -> ImatrixData:
    """Every kind in every layer; optionally one expert that never fired."""
    rng = np.random.default_rng(1)
    ents = {}
    for i in range(3):
        ents[f"blk.{i}.attn_q.weight"] = Entry(rng.random(8) + 0.1, [64.0])
        counts = np.array([30.0, 20.0, 0.0 if (dead and i == 1) else 10.0])
        vals = (rng.random((3, 8)) + 0.1) * (counts[:, None] > 0)
        ents[f"blk.{i}.ffn_up_exps.weight"] = Entry(vals.reshape(-1), counts)
    return ImatrixData(entries=ents)


def test_heatmap_marks_missing_cells(tmp_path) -> None:
    full, _ = compute_statistics(full_grid(dead=False))
    gaps, _ = compute_statistics(small_imatrix())
    a = plot_layer_heatmap(full, tmp_path / "full.png", "sum_sqact")
    b = plot_layer_heatmap(gaps, tmp_path / "gaps.png", "sum_sqact")
    # a missing cell is thousands of grey pixels; anti-aliased text makes a few hundred
    assert n_grey(pixels(a)) < 1000
    assert n_grey(pixels(b)) > 2 * 5000  # attn_k absent in layers 0-1, ffn_down in layer 1
    # CosSim has no value for layer 0: grey even with a full grid
    c = plot_layer_heatmap(full, tmp_path / "cos.png", "cossim")
    assert n_grey(pixels(c)) > 5000


def test_expert_plot_marks_dead_experts(tmp_path) -> None:
    ok = plot_expert_counts(full_grid(dead=False), tmp_path / "ok.png")
    dead = plot_expert_counts(full_grid(dead=True), tmp_path / "dead.png")
    assert ok is not None and dead is not None
    assert n_red(pixels(ok)) == 0
    assert n_red(pixels(dead)) > 20


def test_dense_model_has_no_expert_plot(tmp_path) -> None:
    d = small_imatrix()
    dense = ImatrixData(entries={n: e for n, e in d.entries.items() if e.n_counts == 1})
    assert plot_expert_counts(dense, tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()


def test_write_plots_standard_set(tmp_path) -> None:
    d = small_imatrix()
    t, _ = compute_statistics(d)
    paths = write_plots(d, t, tmp_path / "plots")
    names = sorted(p.name for p in paths)
    want = [f"layers_{s}.png" for s in (*DEFAULT_STATISTICS, *PREFERRED_STATISTICS)]
    assert names == sorted([*want, "expert_counts.png"])
    for p in paths:
        pixels(p)
    # without activation sums, no preferred-mode plots
    d2 = small_imatrix(with_sums=False)
    t2, _ = compute_statistics(d2)
    names2 = {p.name for p in write_plots(d2, t2, tmp_path / "legacy")}
    assert "layers_ecs.png" not in names2 and "layers_sum_sqact.png" in names2


def test_comparison_plot(tmp_path) -> None:
    a, b = small_imatrix(seed=0), small_imatrix(seed=1)
    p = plot_comparison(compare_imatrices(a, b), tmp_path / "cmp.png", labels=("wiki", "code"))
    pixels(p)
    other = ImatrixData(entries={"blk.0.other.weight": Entry(np.ones(4), [1.0])})
    with pytest.raises(ImatrixError, match="no tensors in common"):
        plot_comparison(compare_imatrices(a, other), tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_plot_errors_leave_nothing(tmp_path) -> None:
    t, _ = compute_statistics(small_imatrix())
    target = tmp_path / "keep.png"
    target.write_bytes(b"previous")
    with pytest.raises(ImatrixError, match="unknown statistic 'bogus'"):
        plot_layer_heatmap(t, target, "bogus")
    with pytest.raises(ImatrixError, match="does not exist"):
        plot_layer_heatmap(t, tmp_path / "no" / "such" / "dir.png")
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.png"]
    no_blocks = t[t["layer"].isna()]
    with pytest.raises(ImatrixError, match="no tensors inside blocks"):
        plot_layer_heatmap(no_blocks, tmp_path / "x.png")


def test_cli_plot_options(tmp_path, capsys) -> None:
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_imatrix(small_imatrix(seed=0), a)
    write_imatrix(small_imatrix(seed=2), b)
    out = tmp_path / "plots"
    assert (
        main(["stats", str(a), "--plot", str(out), "--statistic", "zd_pct", "--no-table", "-q"])
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["expert_counts.png", "layers_zd_pct.png"]
    assert capsys.readouterr().out == ""
    assert main(["compare", str(a), str(b), "--plot", str(tmp_path / "cmp.png"), "-q"]) == 0
    pixels(tmp_path / "cmp.png")
