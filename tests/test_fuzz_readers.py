"""Property tests: whatever bytes the readers get, only ImatrixError may escape.

The default run tries a few hundred cases per property; set IMATRIX_FUZZ_EXAMPLES
(e.g. 5000) for the longer, dedicated run.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imatrix.errors import ImatrixError
from imatrix.formats import load_means, read_imatrix, to_dat_bytes, to_gguf_bytes
from imatrix.model import Entry, ImatrixData, Provenance

EXAMPLES = int(os.environ.get("IMATRIX_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _sample() -> ImatrixData:
    rng = np.random.default_rng(7)
    entries = {
        "blk.0.attn_k.weight": Entry(rng.random(16), [64.0], rng.standard_normal(16)),
        "blk.0.ffn_up_exps.weight": Entry(
            rng.random(32), [10.0, 0.0, 30.0, 24.0], rng.standard_normal(32)
        ),
    }
    return ImatrixData(entries, ["d.txt"], 1, 64, Provenance(model_sha256="a" * 64))


GGUF = to_gguf_bytes(_sample())
DAT = to_dat_bytes(_sample())


def _read_all_ways(path: Path) -> None:
    for strict in (True, False):
        with contextlib.suppress(ImatrixError):
            read_imatrix(path, chunk_size=64, strict=strict)
    with contextlib.suppress(ImatrixError):
        load_means(path)


def _mutations(seed_blob: bytes):
    n = len(seed_blob)
    return st.one_of(
        # truncation at any point
        st.integers(0, n - 1).map(lambda k: seed_blob[:k] or b"\0"),
        # random byte flips (several)
        st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), min_size=1, max_size=8).map(
            lambda flips: _flip(seed_blob, flips)
        ),
        # a random 8-byte field overwritten with an extreme value
        st.tuples(
            st.integers(0, n - 8),
            st.sampled_from([b"\xff" * 8, b"\x00" * 8, b"\x7f" + b"\xff" * 7]),
        ).map(lambda t: seed_blob[: t[0]] + t[1] + seed_blob[t[0] + 8 :]),
        # garbage appended
        st.binary(min_size=1, max_size=64).map(lambda tail: seed_blob + tail),
    )


def _flip(blob: bytes, flips) -> bytes:
    b = bytearray(blob)
    for i, v in flips:
        b[i] = v
    return bytes(b)


@FUZZ
@given(data=_mutations(GGUF))
def test_mutated_gguf_only_raises_our_error(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("fz") / "x.gguf"
    p.write_bytes(data)
    _read_all_ways(p)


@FUZZ
@given(data=_mutations(DAT))
def test_mutated_dat_only_raises_our_error(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("fz") / "x.dat"
    p.write_bytes(data)
    _read_all_ways(p)


@FUZZ
@given(data=st.binary(min_size=1, max_size=512))
def test_random_bytes_only_raise_our_error(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("fz") / "x.bin"
    p.write_bytes(data)
    _read_all_ways(p)


@FUZZ
@given(data=st.binary(min_size=0, max_size=256))
def test_random_bytes_after_gguf_magic(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("fz") / "x.gguf"
    p.write_bytes(b"GGUF\x03\x00\x00\x00" + data)
    _read_all_ways(p)
