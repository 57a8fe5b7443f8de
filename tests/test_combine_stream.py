"""``combine`` folds its inputs one at a time: lazily read, never all held at once."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import imatrix.workflow.merge as wf_merge
from imatrix.errors import ImatrixError
from imatrix.formats import read_imatrix, to_gguf_bytes, write_imatrix
from imatrix.model import Entry, ImatrixData, Provenance, combine

N_EMBD = 256
N_EXPERTS = 8
N_TENSORS = 16


def _data(seed: int, *, model: str = "m" * 64, skip: str | None = None) -> ImatrixData:
    rng = np.random.default_rng(seed)
    entries = {
        f"blk.{k}.ffn_up_exps.weight": Entry(
            rng.random(N_EMBD * N_EXPERTS),
            rng.integers(1, 100, size=N_EXPERTS).astype(float),
            rng.normal(size=N_EMBD * N_EXPERTS),
        )
        for k in range(N_TENSORS)
    }
    entries.pop(skip or "", None)
    return ImatrixData(
        entries=entries,
        datasets=[f"d{seed}"],
        chunk_size=64,
        provenance=Provenance(model_sha256=model, dataset_sha256=[str(seed)]),
    )


def _float64_bytes(d: ImatrixData) -> int:
    return sum(
        e.values.nbytes + (0 if e.sums is None else e.sums.nbytes) for e in d.entries.values()
    )


def test_inputs_are_read_in_order_and_not_after_a_refused_one() -> None:
    calls: list[int] = []

    def loader(i: int, model: str) -> Callable[[], ImatrixData]:
        def load() -> ImatrixData:
            calls.append(i)
            return _data(i, model=model)

        return load

    models = ["a" * 64, "a" * 64, "b" * 64, "a" * 64]
    with pytest.raises(ImatrixError, match=r"different models \(model sha256 aaaa.*bbbb"):
        combine(loader(i, m) for i, m in enumerate(models))
    assert calls == [0, 1, 2]  # the fourth was never read


def _peak(n: int) -> tuple[int, int]:
    """Peak traced bytes of combining ``n`` inputs made on demand, and one input's size."""

    def inputs() -> Iterator[ImatrixData]:
        for i in range(n):
            yield _data(i)

    one = _float64_bytes(_data(0))
    tracemalloc.start()
    try:
        out = combine(inputs(), weights=[1.0 + i % 3 for i in range(n)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.datasets == [f"d{i}" for i in range(n)]
    return peak, one


def test_peak_memory_does_not_grow_with_the_number_of_inputs() -> None:
    """The running total (float32) + one input (float64), or the float64 result: the
    peak is the same for 2 and for 24 inputs, and well under 24 inputs' worth."""
    peak2, one = _peak(2)
    peak24, _ = _peak(24)
    assert peak24 < 2 * one
    assert peak24 < 1.2 * peak2


def test_a_generator_gives_the_same_result_as_a_list() -> None:
    items = [_data(1), _data(2, skip="blk.3.ffn_up_exps.weight"), _data(3)]
    ref = to_gguf_bytes(combine(items, weights=[1.0, 2.0, 3.0]))
    lazy = combine(
        (
            lambda i=i: _data(i + 1, skip=None if i != 1 else "blk.3.ffn_up_exps.weight")
            for i in range(3)
        ),
        weights=[1.0, 2.0, 3.0],
    )
    assert to_gguf_bytes(lazy) == ref
    # a tensor missing from the middle input keeps its sums and counts but loses in_sum
    assert lazy.entries["blk.3.ffn_up_exps.weight"].sums is None
    assert lazy.entries["blk.4.ffn_up_exps.weight"].sums is not None


def test_weights_must_match_the_inputs_of_a_generator() -> None:
    with pytest.raises(ImatrixError, match="2 weights given for 3 inputs"):
        combine([_data(1), _data(2), _data(3)], weights=[1.0, 2.0])
    with pytest.raises(ImatrixError, match="2 weights given for more than 2 inputs"):
        combine((_data(i) for i in range(3)), weights=[1.0, 2.0])
    with pytest.raises(ImatrixError, match="3 weights given for 2 inputs"):
        combine((_data(i) for i in range(2)), weights=[1.0, 2.0, 3.0])
    with pytest.raises(ImatrixError, match="nothing to combine"):
        combine(iter([]))


def test_merge_checks_provenance_from_headers_before_reading_any_shard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = []
    for i, model in enumerate(["a" * 64, "a" * 64, "b" * 64]):
        d = _data(i, model=model)
        d.datasets = ["x"]
        d.provenance.dataset_sha256 = ["x" * 64]
        paths.append(str(tmp_path / f"s{i}.gguf"))
        write_imatrix(d, paths[-1])
    reads: list[str] = []

    def counting_read(path: str) -> ImatrixData:
        reads.append(path)
        return read_imatrix(path)

    monkeypatch.setattr(wf_merge, "read_imatrix", counting_read)
    out = tmp_path / "m.gguf"
    with pytest.raises(ImatrixError, match="shards disagree on the model sha256"):
        wf_merge.merge_shards(paths, ["x"] * 3, str(out))
    assert reads == [] and not out.exists()
    wf_merge.merge_shards(paths[:2], ["x"] * 2, str(out))
    assert reads == paths[:2]  # each shard read once, in order
    ref = combine([read_imatrix(p) for p in paths[:2]])
    merged = read_imatrix(out)
    for name, e in ref.entries.items():
        assert merged.entries[name].values.tobytes() == e.values.tobytes()
