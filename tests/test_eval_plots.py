"""The evaluation's picture and table, from hand-made summaries (no model runs): the
KLD-vs-size plot draws stock and planned quants apart, with intervals, one panel per
evaluation text; the report table leads with what people compare; heat-map labels
are short."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from imatrix.eval_plots import kld_figure, plot_kld_vs_size, point_kind
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


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


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
    assert _legend(ax) == [
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
