"""A tokens ``.npy`` and its ``.json`` record can never silently disagree.

They are two files, written one after the other; the record names its tokens
(``tokens_sha256``) and is written first. ``imatrix tokenize`` of another text is
killed for real (``IMATRIX_FAULT``) between the two writes, and before the first:
readers either find the old, consistent pair, or refuse the pair with one line that
names the record, and tokenizing again repairs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imatrix import faults
from imatrix.errors import ImatrixError
from imatrix.tokenize import load_tokens, tokenize_file, tokens_sha256

pytestmark = pytest.mark.timeout(300)


def _run(*args: object, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    if fault:
        env[faults.ENV] = fault
    return subprocess.run(
        [sys.executable, "-m", "imatrix", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _tokenize(model: Path, text: Path, out: Path, fault: str | None = None):
    return _run("tokenize", "-m", model, "-f", text, "-o", out, fault=fault)


@pytest.fixture
def other_text(tmp_path, calib_text) -> Path:
    p = tmp_path / "other.txt"
    p.write_text(calib_text.read_text(encoding="utf-8")[:5000], encoding="utf-8")
    return p


def test_record_names_its_tokens(dense_model, calib_text, tmp_path):
    out = tmp_path / "t.npy"
    rec = tokenize_file(dense_model, calib_text, out)
    arr, meta = load_tokens(out)
    assert meta is not None and meta["tokens_sha256"] == rec["tokens_sha256"]
    assert rec["tokens_sha256"] == tokens_sha256(np.load(out)) == tokens_sha256(arr)


def test_killed_between_the_two_writes(dense_model, calib_text, other_text, tmp_path):
    """The new record is in place, the new tokens are not: refused everywhere."""
    out = tmp_path / "t.npy"
    assert _tokenize(dense_model, calib_text, out).returncode == 0
    old = out.read_bytes()
    killed = _tokenize(dense_model, other_text, out, fault="write.partial:t.npy")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert out.read_bytes() == old
    assert json.loads(out.with_suffix(".json").read_text())["text"] == str(other_text)
    with pytest.raises(ImatrixError, match=r"t\.json: records other tokens than .*t\.npy"):
        load_tokens(out)
    proc = _run("collect", "-m", dense_model, "--tokens", out, "-o", tmp_path / "o.gguf")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("imatrix collect: error: ")
    assert "records other tokens" in proc.stderr and "tokenize again" in proc.stderr
    assert not (tmp_path / "o.gguf").exists()
    assert _tokenize(dense_model, other_text, out).returncode == 0  # repaired
    arr, meta = load_tokens(out)
    assert meta is not None and meta["text"] == str(other_text)
    assert meta["n_tokens"] == arr.size


def test_killed_before_the_record_is_in_place(dense_model, calib_text, other_text, tmp_path):
    """Nothing of the new run is visible: the old pair is intact and consistent."""
    out = tmp_path / "t.npy"
    assert _tokenize(dense_model, calib_text, out).returncode == 0
    old_tokens, old_meta = load_tokens(out)
    killed = _tokenize(dense_model, other_text, out, fault="write.complete:t.json")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    tokens, meta = load_tokens(out)
    assert meta == old_meta
    np.testing.assert_array_equal(tokens, old_tokens)


def test_a_record_without_the_tokens_sha256_still_loads(dense_model, calib_text, tmp_path):
    """Records written before the key existed are checked by their token count."""
    out = tmp_path / "t.npy"
    rec = tokenize_file(dense_model, calib_text, out)
    del rec["tokens_sha256"]
    out.with_suffix(".json").write_text(json.dumps(rec))
    arr, meta = load_tokens(out)
    assert meta == rec and arr.size == rec["n_tokens"]
