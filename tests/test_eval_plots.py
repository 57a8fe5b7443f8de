"""The evaluation's picture and table, from hand-made summaries (no model runs): the
KLD-vs-size plot draws stock and planned quants apart, with intervals, one panel per
evaluation text, one label for coincident points, no label over another, round
numbers only on its log axis and the legend off the panels; the report table leads
with what people compare; heat-map labels are short."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from imatrix.eval_plots import group_label, kld_figure, log_ticks, plot_kld_vs_size, point_kind
from imatrix.plots import compact_number
from imatrix.workflow.report import evaluation_table


def summary() -> pd.DataFrame:
    """Base, two stock types (one also without imatrix) and two planned mixes."""
    rows = [
        ("m-F16", "F16", None, False, True, 500e6, 16.0, 0.0),
        ("m-Q4_K_M", "Q4_K_M", None, True, False, 250e6, 7.4, 0.005),
        ("m-Q4_K_M", "Q4_K_M", None, False, False, 250e6, 7.4, 0.006),
        ("m-Q2_K", "Q2_K", None, True, False, 237e6, 6.9, 0.3),
        ("m-mix-Q2_K", "Q2_K", "mix-Q2_K", True, False, 236e6, 6.8, 0.03),
        ("m-mix-Q4_K_M", "Q4_K_M", "mix-Q4_K_M", True, False, 249e6, 7.3, 0.002),
    ]
    df = pd.DataFrame(
        rows,
        columns=["model", "type", "recipe", "imatrix", "is_base", "file_size", "bpw", "kld_mean"],
    )
    df["kld_ci_low"] = df["kld_mean"] * 0.9
    df["kld_ci_high"] = df["kld_mean"] * 1.1
    df["same_top_p"] = 1.0 - df["kld_mean"]
    df["ppl"] = 20.0 + df["kld_mean"]
    df["ppl_err"] = 0.5
    df["kld_err"] = 0.001
    df["path"] = "results/" + df["model"] + ".gguf"
    df["text"] = "eval.txt"
    return df


def demo_summary() -> pd.DataFrame:
    """The demo's evaluation (gemma-3-270m): two plans that chose the same recipe, a plan
    that came out as stock Q4_K_M, and Q4_K_M without the imatrix at that size too."""
    rows = [
        ("F16", None, False, True, 542833344, 0.0),
        ("Q4_K_M", None, True, False, 253113248, 0.004541),
        ("IQ3_XXS", None, True, False, 235971488, 0.200330),
        ("Q2_K", None, True, False, 237077408, 0.290890),
        ("Q4_K_M", "mix-Q4_K_M", True, False, 253113248, 0.004541),
        ("IQ3_XXS", "mix-IQ3_XXS", True, False, 200766368, 0.017539),
        ("Q2_K", "mix-Q2_K", True, False, 200766368, 0.017539),
        ("Q4_K_M", None, False, False, 253113024, 0.004562),
        ("Q2_K", None, False, False, 237077184, 0.491868),
    ]
    df = pd.DataFrame(
        rows, columns=["type", "recipe", "imatrix", "is_base", "file_size", "kld_mean"]
    )
    df["kld_ci_low"] = df["kld_mean"] * 0.9
    df["kld_ci_high"] = df["kld_mean"] * 1.1
    return df


def _legend(fig: Figure) -> list[str]:
    (legend,) = fig.legends
    return [t.get_text() for t in legend.get_texts()]


def _drawn(fig: Figure) -> Figure:
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig


def _boxes(texts: list[Text], fig: Figure) -> list[Bbox]:
    """Where each text's letters are (an annotation's leader left out)."""
    renderer = fig.canvas.get_renderer()
    return [Text.get_window_extent(t, renderer) for t in texts]


def _overlapping(boxes: list[Bbox], names: list[str]) -> list[tuple[str, str]]:
    return [
        (names[i], names[j])
        for i in range(len(boxes))
        for j in range(i + 1, len(boxes))
        if boxes[i].overlaps(boxes[j])
    ]


def test_plot_shows_stock_and_planned_apart(tmp_path: Path) -> None:
    df = summary()
    assert [point_kind(r) for _, r in df.iloc[1:].iterrows()] == [
        "imatrix",
        "plain",
        "imatrix",
        "planned",
        "planned",
    ]
    fig = kld_figure(df)
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert _legend(fig) == [
        "planned mix (imatrix plan)",
        "stock type, with the imatrix",
        "stock type, without imatrix",
    ]
    assert ax.get_yscale() == "log"
    labels = {t.get_text() for t in ax.texts}
    assert {"mix-Q2_K", "mix-Q4_K_M", "Q4_K_M", "Q2_K"} <= labels and "F16" not in labels
    # the planned points carry their interval as error bars
    planned = ax.containers[0]
    (bars,) = planned.lines[2]
    segments = bars.get_segments()
    assert len(segments) == 2
    assert sorted(round(s[1][1] - s[0][1], 6) for s in segments) == [0.0004, 0.006]
    out = plot_kld_vs_size(df, tmp_path / "kld.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_panel_per_evaluation_text() -> None:
    df = pd.concat([summary().assign(eval_set="prose"), summary().assign(eval_set="code")])
    fig = kld_figure(df)
    assert [ax.get_title() for ax in fig.axes] == [
        "evaluation text: code",
        "evaluation text: prose",
    ]
    one = kld_figure(summary().assign(eval_set="prose"))
    assert len(one.axes) == 1


def test_coincident_points_get_one_label() -> None:
    ax = kld_figure(demo_summary()).axes[0]
    labels = sorted(t.get_text() for t in ax.texts)
    assert labels == sorted(
        [
            "mix-IQ3_XXS = mix-Q2_K",
            "Q4_K_M = mix-Q4_K_M",
            "IQ3_XXS",
            "Q2_K",  # with the imatrix
            "Q2_K",  # without: another KLD
            "Q4_K_M",  # without: another KLD (0.5 %), the same size
        ]
    )
    colours = {t.get_text(): t.get_color() for t in ax.texts}
    assert colours["mix-IQ3_XXS = mix-Q2_K"] == "tab:red"
    assert colours["Q4_K_M = mix-Q4_K_M"] == "0.2"  # two kinds


def test_a_stock_type_the_imatrix_did_not_change_says_so() -> None:
    rows = demo_summary().iloc[[1, 7]].assign(kld_mean=0.004541, file_size=253113248)
    assert group_label(rows).text == "Q4_K_M = Q4_K_M (no imatrix)"
    assert group_label(rows.iloc[[1]]).left_first  # alone: left of its point
    assert not group_label(rows).left_first


def test_no_label_covers_another_or_a_tick_label() -> None:
    for df in (demo_summary(), summary()):
        fig = _drawn(kld_figure(df, title="gemma-3-270m"))
        ax = fig.axes[0]
        ticks = [t for t in ax.get_yticklabels() + ax.get_xticklabels() if t.get_text()]
        texts = list(ax.texts) + ticks
        names = [t.get_text() for t in texts]
        assert _overlapping(_boxes(texts, fig), names) == []
        frame = ax.get_window_extent()
        assert all(
            frame.contains(b.x0, b.y0) and frame.contains(b.x1, b.y1)
            for b in _boxes(list(ax.texts), fig)
        )


def test_log_axis_labels_round_values_only() -> None:
    fig = _drawn(kld_figure(demo_summary()))
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    shown = [t for t in ax.get_yticklabels() if t.get_text() and lo <= t.get_position()[1] <= hi]
    assert [t.get_text() for t in shown] == ["0.01", "0.1"]
    assert [t.get_text() for t in ax.yaxis.get_minorticklabels() if t.get_text()] == []
    assert len(ax.yaxis.get_minorticklocs()) > 0  # the minor ticks are still drawn


@pytest.mark.parametrize(
    "lo,hi,ticks",
    [
        (0.0035, 0.6, [0.01, 0.1]),  # two powers of ten
        (0.004, 0.03, [0.005, 0.01, 0.02]),  # one: 1-2-5
        (0.0025, 0.0045, [0.003, 0.004]),  # one 1-2-5 tick: every digit
    ],
)
def test_log_ticks(lo: float, hi: float, ticks: list[float]) -> None:
    assert log_ticks(lo, hi) == (ticks, lo, hi)


def test_a_narrow_log_axis_widens_to_two_ticks() -> None:
    assert log_ticks(0.0042, 0.0049) == ([0.004, 0.005], 0.004, 0.005)


def test_legend_is_outside_every_panel() -> None:
    df = pd.concat(
        [demo_summary().assign(eval_set="prose"), demo_summary().assign(eval_set="code")]
    )
    for fig in (_drawn(kld_figure(demo_summary())), _drawn(kld_figure(df))):
        legends = list(fig.legends) + [a.get_legend() for a in fig.axes if a.get_legend()]
        assert len(legends) == 1  # one for every panel
        box = legends[0].get_window_extent()
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent())
            assert not any(box.overlaps(b) for b in _boxes([ax.xaxis.label], fig))
        assert box.y0 >= 0 and box.x0 >= 0 and box.x1 <= fig.bbox.x1


def test_report_table_leads_with_the_comparison() -> None:
    t = evaluation_table(summary())
    assert list(t.columns[:8]) == [
        "type",
        "recipe",
        "imatrix",
        "size (MB)",
        "bits/weight",
        "KLD mean ± 95 % CI",
        "same top (%)",
        "PPL",
    ]
    assert list(t.columns[-2:]) == ["path", "text"]
    assert t["type"].iloc[0] == "F16"  # the base first, then by size
    assert list(t["size (MB)"]) == ["500.0", "236.0", "237.0", "249.0", "250.0", "250.0"]
    assert t["KLD mean ± 95 % CI"].iloc[1] == "0.03000 ± 0.00300"
    assert t["recipe"].iloc[1] == "mix-Q2_K" and t["recipe"].iloc[2] == ""


@pytest.mark.parametrize(
    "value,text",
    [
        (185_000.0, "185k"),
        (1_324.0, "1.32k"),
        (999.7, "1k"),
        (13.3, "13.3"),
        (0.998, "0.998"),
        (0.000889, "8.9e-4"),
        (-5.38e-05, "-5.4e-5"),
        (2.5e9, "2.5G"),
        (0.0, "0"),
        (math.nan, ""),
    ],
)
def test_compact_number(value: float, text: str) -> None:
    assert compact_number(value) == text
