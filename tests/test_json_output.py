"""Every ``--json`` output is strict JSON: no NaN or Infinity, which strict parsers reject.

``imatrix evaluate --json`` is checked in tests/test_evaluate.py (it needs models);
``info`` and ``check`` here, on files whose values are not all finite.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from imatrix.cli import main
from imatrix.formats import to_gguf_bytes
from imatrix.jsonout import dumps, finite
from imatrix.model import Entry, ImatrixData, Provenance


def strict_loads(text: str) -> Any:
    """``json.loads`` that refuses NaN, Infinity and -Infinity, as strict parsers do."""

    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_strict_loads_refuses_what_python_writes_by_default():
    with pytest.raises(ValueError, match="NaN"):
        strict_loads(json.dumps({"a": float("nan")}))


def test_non_finite_values_become_null():
    obj = {
        "a": float("nan"),
        "b": [np.float32("inf"), -np.inf, 1.5, np.int64(3)],
        "c": (np.array([np.nan, 2.0]),),
        "d": np.bool_(True),
    }
    assert finite(obj) == {"a": None, "b": [None, None, 1.5, 3], "c": [[None, 2.0]], "d": True}
    assert strict_loads(dumps(obj)) == finite(obj)


@pytest.fixture
def nonfinite_file(tmp_path):
    """An imatrix with NaN and infinite values, and NaN inside its tokenizer record."""
    rng = np.random.default_rng(0)
    vals = rng.random(16) + 0.5
    vals[0], vals[1] = np.nan, np.inf
    data = ImatrixData(
        entries={
            "blk.0.attn_q.weight": Entry(vals, [0.0], rng.normal(size=16)),
            "blk.0.ffn_up_exps.weight": Entry(rng.random(32), np.array([np.nan, 4.0])),
        },
        datasets=["d.txt"],
        chunk_count=1,
        chunk_size=512,
        provenance=Provenance(tokenizer='{"x": NaN}'),
    )
    p = tmp_path / "nonfinite.gguf"
    p.write_bytes(to_gguf_bytes(data))
    return p


@pytest.mark.parametrize("command", ["info", "check"])
def test_json_output_is_strict(nonfinite_file, capsys, command):
    rc = main([command, str(nonfinite_file), "--json"])
    out = capsys.readouterr().out
    assert rc in (0, 1)
    doc = strict_loads(out)
    assert isinstance(doc, dict) and doc


def test_info_tokenizer_nan_becomes_null(nonfinite_file, capsys):
    assert main(["info", str(nonfinite_file), "--json"]) == 0
    doc = strict_loads(capsys.readouterr().out)
    assert doc["provenance"]["tokenizer"] == {"x": None}
