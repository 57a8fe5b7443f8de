"""Dataset sampling and document boundaries (imatrix.sampling), at tokenize time.

What is proven: the draw is a fixed function of the seed (golden values from
``random.Random.random``, the one method Python keeps stable); a sample is reproducible,
differs for another seed, and consists of whole chunks of llama-imatrix's stream; with
document boundaries every chunk is BOS followed by a document's first tokens, packed
into the next documents when short, recomputed here from the documents' own tokens;
collect's chunk plan decodes exactly the chunks written; the choice reaches the
imatrix provenance (not the ``--compat`` layout) and a merge refuses shards of one
dataset chosen differently; bad settings give one error naming the dataset.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
from tinymodels import sample_text

from imatrix.cli import main
from imatrix.collect import CollectSettings, collect
from imatrix.collect.plan import plan_chunks
from imatrix.errors import ImatrixError
from imatrix.formats import read_imatrix, to_gguf_bytes
from imatrix.llama_api import load_model, tokenize
from imatrix.model import combine
from imatrix.sampling import Selection, document_chunks, draw
from imatrix.tokenize import load_tokens, tokenize_file
from imatrix.workflow.datasets import load_documents
from imatrix.workflow.merge import merge_shards

BOS = 1  # the tiny models' BOS id
N_CTX = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A text of paragraphs, some shorter and some longer than one chunk; one blank line
    holds spaces."""
    lengths = (6, 40, 3, 90, 12, 25, 60, 8, 150, 30, 45, 5, 70, 20)
    paras = [sample_text(n, seed=i).strip() for i, n in enumerate(lengths)]
    p = tmp_path_factory.mktemp("sampling") / "corpus.txt"
    p.write_text("\n\n".join(paras[:5]) + "\n  \n" + "\n\n".join(paras[5:]) + "\n", "utf-8")
    return p


def _doc_tokens(model: Path, docs: list[str]) -> list[np.ndarray]:
    with load_model(model, vocab_only=True) as m:
        return [tokenize(m, d + "\n\n", add_special=False, parse_special=False) for d in docs]


def test_draw_is_a_fixed_function_of_the_seed() -> None:
    assert random.Random(1).random() == 0.13436424411240122  # Python's documented stream
    assert draw(10, 4, 1) == [1, 8, 0, 4]
    assert draw(1000, 5, 42) == [639, 25, 276, 225, 737]
    assert draw(10, 4, 2) == [9, 0, 2, 3]
    assert sorted(draw(7, 7, 3)) == list(range(7))


def test_sample_is_reproducible_and_made_of_stream_chunks(
    dense_model: Path, corpus: Path, tmp_path: Path
) -> None:
    stream = tmp_path / "stream.npy"
    tokenize_file(dense_model, corpus, stream)
    whole, _ = load_tokens(stream)
    sel = Selection(N_CTX, chunks=6, seed=5)
    a = tokenize_file(dense_model, corpus, tmp_path / "a.npy", selection=sel, dataset="alpha")
    b = tokenize_file(dense_model, corpus, tmp_path / "b.npy", selection=sel, dataset="alpha")
    c = tokenize_file(
        dense_model, corpus, tmp_path / "c.npy", selection=Selection(N_CTX, chunks=6, seed=6)
    )
    ta, tb, tc = (load_tokens(tmp_path / f"{x}.npy")[0] for x in "abc")
    assert ta.size == 6 * N_CTX and np.array_equal(ta, tb) and not np.array_equal(ta, tc)
    assert a == b and a["tokens_sha256"] != c["tokens_sha256"]
    s = a["selection"]
    assert s["sample"] == {"chunks": 6, "seed": 5} and s["boundary"] == "stream"
    assert s["chunks_available"] == whole.size // N_CTX
    assert s["chunk_starts"] == [k * N_CTX for k in draw(s["chunks_available"], 6, 5)]
    for k, off in enumerate(s["chunk_starts"]):
        assert np.array_equal(ta[k * N_CTX : (k + 1) * N_CTX], whole[off : off + N_CTX])
    assert json.loads((tmp_path / "a.json").read_text()) == a


def test_document_chunks_start_at_documents(
    dense_model: Path, corpus: Path, tmp_path: Path
) -> None:
    rec = tokenize_file(
        dense_model, corpus, tmp_path / "d.npy", selection=Selection(N_CTX, "document")
    )
    toks, _ = load_tokens(tmp_path / "d.npy")
    docs = load_documents(corpus)
    assert len(docs) == 14 and not any(d.startswith(("\n", " ")) for d in docs)
    per_doc = _doc_tokens(dense_model, docs)
    assert min(map(len, per_doc)) < N_CTX - 1 < max(map(len, per_doc))  # both cases occur
    starts = rec["selection"]["chunk_starts"]
    # recomputed: a chunk takes BOS + the next n_ctx - 1 tokens from its document on; the
    # next chunk starts at the first document it did not reach
    want, i = [], 0
    while i < len(docs):
        run = np.concatenate(per_doc[i:])
        if run.size < N_CTX - 1:
            break
        want.append(i)
        used, j = len(per_doc[i]), i + 1
        while used < N_CTX - 1:
            used, j = used + len(per_doc[j]), j + 1
        chunk = toks[len(want[:-1]) * N_CTX : len(want) * N_CTX]
        assert chunk[0] == BOS and np.array_equal(chunk[1:], run[: N_CTX - 1])
        i = j
    assert starts == want and toks.size == len(want) * N_CTX
    assert any(b - a > 1 for a, b in itertools.pairwise(starts))  # packing happened


def test_jsonl_records_are_documents(dense_model: Path, tmp_path: Path) -> None:
    """A record is one document even when its text holds blank lines."""
    records = [sample_text(60, seed=s).strip() + "\n\nsecond paragraph." for s in range(5)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"body": r}) + "\n" for r in records), "utf-8")
    rec = tokenize_file(
        dense_model,
        data,
        tmp_path / "d.npy",
        selection=Selection(N_CTX, "document"),
        fmt="auto",
        text_column="body",
    )
    toks, _ = load_tokens(tmp_path / "d.npy")
    per_doc = _doc_tokens(dense_model, records)
    assert rec["selection"]["chunk_starts"] == list(range(5))
    for k, doc in enumerate(per_doc):
        chunk = toks[k * N_CTX : (k + 1) * N_CTX]
        assert chunk[0] == BOS and np.array_equal(chunk[1:], doc[: N_CTX - 1])


def test_packing_without_bos() -> None:
    """A model that adds no BOS: n_ctx document tokens per chunk, nothing inserted."""
    docs = [np.arange(100 * i, 100 * i + n, dtype=np.int32) for i, n in enumerate((3, 2, 9, 1, 4))]
    rows, starts = document_chunks(docs, 4, None)
    assert starts == [0, 2, 3]  # doc 0 runs into doc 1; doc 2 is cut; doc 3 runs into doc 4
    np.testing.assert_array_equal(
        rows, [[0, 1, 2, 100], [200, 201, 202, 203], [300, 400, 401, 402]]
    )
    rows, starts = document_chunks(docs, 4, 7)  # BOS + 3: doc 0 fills a chunk exactly
    assert starts == [0, 1, 3]
    np.testing.assert_array_equal(rows, [[7, 0, 1, 2], [7, 100, 101, 200], [7, 300, 400, 401]])
    assert document_chunks(docs[:1], 8, 7)[1] == []  # too short for any chunk


def test_collect_decodes_exactly_the_chosen_chunks(
    dense_model: Path, corpus: Path, tmp_path: Path
) -> None:
    """collect's chunk plan (BOS replacing each chunk's first token, as llama-imatrix
    does) turns the file back into the chunks written, sequence by sequence."""
    tokenize_file(dense_model, corpus, tmp_path / "d.npy", selection=Selection(N_CTX, "document"))
    toks, _ = load_tokens(tmp_path / "d.npy")
    plan = plan_chunks(toks, CollectSettings(n_ctx=N_CTX, n_batch=2 * N_CTX))
    seen = []
    for g0, n in plan.groups(0):
        for spec in plan.batches(g0, n, BOS):
            seen.extend(spec.tokens.reshape(n, -1))
    np.testing.assert_array_equal(np.stack(seen), toks.reshape(-1, N_CTX))


def test_choice_reaches_the_provenance(
    dense_model: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = CollectSettings(n_ctx=N_CTX, n_batch=N_CTX, compute_ppl=False, threads=1)
    outs = []
    for seed in (1, 2):
        t = tmp_path / f"s{seed}.npy"
        rec = tokenize_file(dense_model, corpus, t, selection=Selection(N_CTX, chunks=2, seed=seed))
        out = tmp_path / f"s{seed}.gguf"
        collect(dense_model, t, out, settings, dataset="alpha")
        chosen = json.loads(read_imatrix(out).provenance.dataset_selection[0])
        assert chosen["sample"] == {"chunks": 2, "seed": seed}
        assert chosen["tokens_sha256"] == rec["tokens_sha256"]
        outs.append(out)
    assert main(["info", str(outs[0])]) == 0
    n = rec["selection"]["chunks_available"]
    assert (
        f"selection:   alpha: 2 of {n} chunks, seed 1, boundary stream" in capsys.readouterr().out
    )
    data = read_imatrix(outs[0])
    assert b"dataset_selection" not in to_gguf_bytes(data, compat=True)
    plain = tmp_path / "plain.npy"
    tokenize_file(dense_model, corpus, plain)
    collect(dense_model, plain, tmp_path / "plain.gguf", settings, dataset="beta")
    assert b"dataset_selection" not in (tmp_path / "plain.gguf").read_bytes()
    both = combine([data, read_imatrix(tmp_path / "plain.gguf")])
    assert both.datasets == ["alpha", "beta"] and both.selections()[1] == ""
    assert json.loads(both.selections()[0])["sample"]["seed"] == 1
    with pytest.raises(ImatrixError, match="chunks chosen from dataset 'alpha'"):
        merge_shards([str(p) for p in outs], ["alpha", "alpha"], str(tmp_path / "m.gguf"))


@pytest.mark.parametrize(
    ("sel", "message"),
    [
        (Selection(N_CTX, "paragraph"), "unknown boundary 'paragraph'"),
        (Selection(N_CTX, chunks=0), "sample chunks must be at least 1, got 0"),
        (Selection(N_CTX, chunks=2, seed="x"), "sample seed must be an integer >= 0, got 'x'"),  # type: ignore[arg-type]
        (Selection(N_CTX, chunks=2, seed=-1), "sample seed must be an integer >= 0"),
    ],
)
def test_bad_settings(sel: Selection, message: str) -> None:
    with pytest.raises(ImatrixError, match=f"^dataset 'alpha': {message}"):
        sel.check("dataset 'alpha'")


def test_too_few_chunks_names_the_dataset(dense_model: Path, corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ImatrixError, match=r"^dataset 'web': sample of 500 chunks asked for, but"):
        tokenize_file(
            dense_model,
            corpus,
            tmp_path / "x.npy",
            selection=Selection(N_CTX, chunks=500),
            dataset="web",
        )
    with pytest.raises(
        ImatrixError, match=r"no complete chunk of 4096 tokens \(boundary: document"
    ):
        tokenize_file(
            dense_model,
            corpus,
            tmp_path / "x.npy",
            selection=Selection(4096, "document"),
            dataset="web",
        )
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "x.json").exists()
