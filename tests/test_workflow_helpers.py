"""The library side of the workflow (imatrix.workflow) without Snakemake: sharding,
datasets, config checks, GPU slots, merging and its provenance checks, resources."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from imatrix.errors import ImatrixError
from imatrix.formats import read_imatrix, write_imatrix
from imatrix.model import Entry, ImatrixData, Provenance, combine
from imatrix.records import jsonl_records, jsonl_values
from imatrix.workflow import resources
from imatrix.workflow.config import (
    canonical_quant_types,
    check_config,
    eval_sets,
    schema_error,
    types_without_imatrix,
)
from imatrix.workflow.datasets import load_dataset_text, write_dataset_text
from imatrix.workflow.gpu import claim_gpu, gpu_slot_count
from imatrix.workflow.merge import merge_shards
from imatrix.workflow.shards import dataset_chunks, shard_count, shard_range
from imatrix.workflow.steps import collect_shard

# --- shards -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 64, 101])
@pytest.mark.parametrize("shards", [1, 2, 3, 5])
def test_shards_partition_the_chunks(n: int, shards: int) -> None:
    if n < shards:
        with pytest.raises(ImatrixError, match="cannot fill"):
            for s in range(shards):
                shard_range(n, s, shards=shards)
        return
    ranges = [shard_range(n, s, shards=shards) for s in range(shards)]
    covered = [c for a, b in ranges for c in range(a, b)]
    assert covered == list(range(n))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(("n", "cps"), [(1, 1), (10, 3), (12, 4), (5, 8)])
def test_chunks_per_shard_partition(n: int, cps: int) -> None:
    count = shard_count(n, chunks_per_shard=cps)
    ranges = [shard_range(n, s, chunks_per_shard=cps) for s in range(count)]
    assert [c for a, b in ranges for c in range(a, b)] == list(range(n))
    assert all(b - a == cps for a, b in ranges[:-1])
    with pytest.raises(ImatrixError, match="does not exist"):
        shard_range(n, count, chunks_per_shard=cps)


def test_shard_errors_name_the_dataset() -> None:
    with pytest.raises(ImatrixError, match=r"dataset 'x'.*2 chunk.*3 shards"):
        shard_range(2, 2, shards=3, dataset="dataset 'x'")
    with pytest.raises(ImatrixError, match="at least 1"):
        shard_range(5, 0, shards=0)


def test_dataset_chunks_counts_whole_chunks(tmp_path: Path) -> None:
    p = tmp_path / "t.npy"
    np.save(p, np.arange(1000, dtype=np.int32))
    assert dataset_chunks(p, 128) == 7  # llama-imatrix: tokens / n_ctx
    assert dataset_chunks(p, 128, 3) == 3
    assert dataset_chunks(p, 128, 50) == 7


# --- datasets -----------------------------------------------------------------------


def test_dataset_formats(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("Hello\nworld\n", encoding="utf-8")
    assert load_dataset_text(txt) == "Hello\nworld\n"

    jl = tmp_path / "b.jsonl"
    jl.write_text(
        json.dumps({"text": "first", "id": 1}) + "\n\n" + json.dumps({"text": "sécond"}) + "\n",
        encoding="utf-8",
    )
    assert load_dataset_text(jl) == "first\n\nsécond"

    pqf = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["one", "two", "three"], "n": [1, 2, 3]}), pqf)
    assert load_dataset_text(pqf, text_column="body") == "one\n\ntwo\n\nthree"
    # an explicit format wins over the extension
    odd = tmp_path / "d.data"
    odd.write_text(json.dumps({"text": "x"}) + "\n", encoding="utf-8")
    assert load_dataset_text(odd, "jsonl") == "x"
    assert load_dataset_text(odd) == odd.read_text(encoding="utf-8")

    out = tmp_path / "out" / "x.txt"
    out.parent.mkdir()
    write_dataset_text(pqf, out, text_column="body")
    assert out.read_bytes() == b"one\n\ntwo\n\nthree"


@pytest.mark.parametrize(
    ("name", "content", "column", "message"),
    [
        (
            "a.jsonl",
            '{"text": "ok"}\n{"txt": "no"}\n',
            "text",
            r"a\.jsonl:2: record has no field 'text'",
        ),
        ("b.jsonl", '{"text": "ok"}\nnot json\n', "text", r"b\.jsonl:2: not a JSON object"),
        ("c.jsonl", '{"text": 3}\n', "text", r"c\.jsonl:1: field 'text' is not a string"),
        ("d.jsonl", "\n\n", "text", r"d\.jsonl: no records"),
    ],
)
def test_dataset_errors(tmp_path: Path, name: str, content: str, column: str, message: str) -> None:
    p = tmp_path / name
    p.write_text(content, encoding="utf-8")
    with pytest.raises(ImatrixError, match=message):
        load_dataset_text(p, text_column=column)


def test_parquet_errors(tmp_path: Path) -> None:
    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"n": [1, 2]}), p)
    with pytest.raises(ImatrixError, match=r"no column 'text' \(columns: n\)"):
        load_dataset_text(p)
    with pytest.raises(ImatrixError, match="column 'n' is int64, not text"):
        load_dataset_text(p, text_column="n")
    bad = tmp_path / "y.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(ImatrixError, match="not a Parquet file"):
        load_dataset_text(bad)
    latin = tmp_path / "z.txt"
    latin.write_bytes(b"caf\xe9")
    with pytest.raises(ImatrixError, match="not UTF-8"):
        load_dataset_text(latin)


def test_jsonl_records_end_at_line_feeds(tmp_path: Path) -> None:
    """A record's string may hold U+2028 and U+0085 unescaped (``json.dumps`` with
    ``ensure_ascii=False`` writes them so): lines end at line feeds (and CR LF) only."""
    p = tmp_path / "u.jsonl"
    rec = {"text": "a\u2028b\x85c"}
    p.write_bytes((json.dumps(rec, ensure_ascii=False) + "\r\n" + '{"text": "d"}\n').encode())
    assert jsonl_records(p, "text") == ["a\u2028b\x85c", "d"]
    p.write_text('\n{"text": "e"}\nnot json\n', encoding="utf-8")
    assert jsonl_values(p, "text", limit=1) == [(2, "e")]  # line 3 is not parsed


# --- config -------------------------------------------------------------------------


def _config(tmp_path: Path) -> dict:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "a.txt").write_text("x")
    return {
        "models": {
            "m": {"path": str(tmp_path / "m.gguf")},
            "demo": {"source": "gemma-3-270m-q4_k_m"},
        },
        "datasets": {"a": {"path": str(tmp_path / "a.txt")}},
        "quantize": {"types": ["q4_k_m", "IQ3_XXS", "Q4_K_M"]},
        "evaluate": {"text": None},
    }


def test_check_config(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    check_config(cfg)
    assert canonical_quant_types(cfg["quantize"]["types"]) == ["Q4_K_M", "IQ3_XXS"]
    assert types_without_imatrix(["Q4_K_M", "IQ3_XXS", "Q2_K"]) == ["Q4_K_M", "Q2_K"]

    cfg["quantize"]["types"].append("Q9_X")
    with pytest.raises(ImatrixError, match=r"quantize\.types: unknown quantization type 'Q9_X'"):
        check_config(cfg)
    cfg = _config(tmp_path)
    cfg["datasets"]["a"]["path"] = str(tmp_path / "missing.txt")
    with pytest.raises(ImatrixError, match=r"datasets\.a\.path: .*missing\.txt: no such file"):
        check_config(cfg)
    cfg = _config(tmp_path)
    cfg["models"]["m"]["path"] = str(tmp_path)
    with pytest.raises(ImatrixError, match=r"models\.m\.path: .*not a regular file"):
        check_config(cfg)
    cfg = _config(tmp_path)
    cfg["evaluate"]["text"] = "nope.txt"
    with pytest.raises(ImatrixError, match=r"evaluate\.text: nope\.txt: no such file"):
        check_config(cfg)


def test_chat_check_only_where_asked(tmp_path: Path) -> None:
    """Cluster jobs read the workflow again with ``check_chat=False``: the chat check
    (which may load model vocabularies) runs in the main process only."""
    cfg = _config(tmp_path)
    (tmp_path / "chat.jsonl").write_text('{"text": "hi"}\n')
    cfg["datasets"]["chat"] = {"path": str(tmp_path / "chat.jsonl"), "format": "chat"}
    with pytest.raises(ImatrixError, match=r"chat\.jsonl:1: record has no field 'messages'"):
        check_config(cfg)
    check_config(cfg, check_chat=False)


def test_eval_sets_and_the_held_out_check(tmp_path: Path) -> None:
    assert eval_sets({"text": "e.txt"}) == {"default": "e.txt"}
    assert eval_sets({"text": None, "texts": {"b": "y", "a": "x"}}) == {"b": "y", "a": "x"}
    assert eval_sets({"text": None, "texts": None}) == {}
    cfg = _config(tmp_path)
    (tmp_path / "held.txt").write_text("y")
    (tmp_path / "copy.txt").write_text("x")  # dataset a's text under another name
    cfg["evaluate"]["texts"] = {"ok": str(tmp_path / "held.txt")}
    check_config(cfg)
    for name, path, message in (
        ("web", "nope.txt", r"evaluate\.texts\.web: nope\.txt: no such file"),
        (
            "web",
            str(tmp_path / "copy.txt"),
            r"evaluate\.texts\.web: .*copy\.txt is the text of "
            r"calibration dataset 'a'; evaluate on held-out text",
        ),
        ("same", str(tmp_path / "a.txt"), r"evaluate\.texts\.same: .*a\.txt is the text of"),
    ):
        cfg["evaluate"]["texts"] = {"ok": str(tmp_path / "held.txt"), name: path}
        with pytest.raises(ImatrixError, match=f"^{message}"):
            check_config(cfg)
    cfg["evaluate"] = {"text": str(tmp_path / "a.txt"), "texts": None}
    with pytest.raises(ImatrixError, match=r"^evaluate\.text: .*a\.txt is the text of"):
        check_config(cfg)
    cfg["evaluate"]["texts"] = {"ok": str(tmp_path / "held.txt")}
    with pytest.raises(ImatrixError, match=r"^evaluate: give either text or texts, not both$"):
        check_config(cfg)


def test_schema_errors_are_one_line(tmp_path: Path) -> None:
    """What Snakemake's validate raises becomes the key's path and the problem."""
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "properties": {"d": {"properties": {"seed": {"type": "integer"}}}},
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(schema))
    with pytest.raises(WorkflowError) as exc:
        validate({"d": {"seed": "x"}}, str(tmp_path / "s.yaml"))
    assert schema_error(exc.value) == "d.seed: 'x' is not of type 'integer'"


# --- GPU slots ----------------------------------------------------------------------


def _hold_slot(slot_dir: str, hold: float, queue) -> None:  # runs in a child process
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    with claim_gpu(2, slot_dir=slot_dir, poll=0.02) as slot:
        queue.put((time.monotonic(), slot, os.environ.get("CUDA_VISIBLE_DEVICES")))
        time.sleep(hold)


def test_gpu_slots_are_claimed_exclusively(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three jobs, two GPUs: the first two get devices 0 and 1, the third waits until one
    of them is released and then gets that device."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_hold_slot, args=(str(tmp_path), 1.5, q)) for _ in range(2)]
    for p in procs:
        p.start()
    first = sorted([q.get(timeout=60), q.get(timeout=60)], key=lambda r: r[1])
    assert [r[1] for r in first] == [0, 1]
    assert [r[2] for r in first] == ["0", "1"]
    late = ctx.Process(target=_hold_slot, args=(str(tmp_path), 0.0, q))
    late.start()
    t3, slot3, env3 = q.get(timeout=60)
    assert t3 >= min(r[0] for r in first) + 1.4  # waited for a release
    assert slot3 in (0, 1) and env3 == str(slot3)
    for p in [*procs, late]:
        p.join(timeout=60)
        assert p.exitcode == 0


def test_gpu_slot_released_when_holder_is_killed(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_hold_slot, args=(str(tmp_path), 60.0, q))
    p.start()
    q.get(timeout=60)
    p.kill()
    p.join()
    with claim_gpu(1, slot_dir=tmp_path, timeout=5) as slot:
        assert slot == 0


def test_gpu_claim_respects_given_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with claim_gpu(2, slot_dir=tmp_path) as slot:
        assert slot is None and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert not list(tmp_path.iterdir())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with claim_gpu(0, slot_dir=tmp_path) as slot:
        assert slot is None and "CUDA_VISIBLE_DEVICES" not in os.environ
    monkeypatch.setenv("IMATRIX_GPU_SLOTS", "2")
    assert gpu_slot_count() == 2
    with claim_gpu(slot_dir=tmp_path) as slot:
        assert slot == 0 and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


# --- merge --------------------------------------------------------------------------


def _shard(
    rng: np.random.Generator, dataset: str, *, model: str = "m" * 64, text: str = "t" * 64
) -> ImatrixData:
    entries = {
        "blk.0.ffn_down.weight": Entry(
            rng.random(8) * 5, [float(rng.integers(1, 50))], rng.normal(size=8)
        ),
        "blk.0.ffn_up_exps.weight": Entry(
            rng.random(12) * 3, rng.integers(0, 9, size=3).astype(float), rng.normal(size=12)
        ),
    }
    return ImatrixData(
        entries=entries,
        datasets=[dataset],
        chunk_size=64,
        provenance=Provenance(model_sha256=model, dataset_sha256=[text], tokenizer='{"bos":1}'),
    )


def _write(tmp_path: Path, name: str, data: ImatrixData) -> str:
    p = tmp_path / name
    write_imatrix(data, p)
    return str(p)


def test_merge_equals_combine_and_lists_datasets_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    shards = [_shard(rng, "a", text="a" * 64) for _ in range(3)] + [
        _shard(rng, "b", text="b" * 64) for _ in range(2)
    ]
    paths = [_write(tmp_path, f"s{i}.gguf", s) for i, s in enumerate(shards)]
    names = ["a", "a", "a", "b", "b"]
    out = tmp_path / "merged.gguf"
    merge_shards(paths, names, str(out), weights={"a": 1.0, "b": 2.0})
    merged = read_imatrix(out)
    assert merged.datasets == ["a", "b"]
    assert merged.provenance.dataset_sha256 == ["a" * 64, "b" * 64]
    assert merged.provenance.model_sha256 == "m" * 64
    ref = combine([read_imatrix(p) for p in paths], weights=[1, 1, 1, 2, 2])
    for name, e in ref.entries.items():
        np.testing.assert_array_equal(merged.entries[name].counts, e.counts)
        np.testing.assert_array_equal(merged.entries[name].values, e.values)
    # the b shards count twice
    c = [read_imatrix(p).entries["blk.0.ffn_down.weight"].counts[0] for p in paths]
    assert merged.entries["blk.0.ffn_down.weight"].counts[0] == sum(c[:3]) + 2 * sum(c[3:])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "x" * 64}, "disagree on the model sha256"),
        ({"text": "x" * 64}, "disagree on the text of dataset 'a'"),
        ({"dataset": "b"}, r"holds dataset\(s\) \['b'\], expected \['a'\]"),
    ],
)
def test_merge_refuses_mismatched_shards(tmp_path: Path, change: dict, message: str) -> None:
    rng = np.random.default_rng(1)
    good = [_shard(rng, "a", text="a" * 64) for _ in range(2)]
    kw = {"text": "a" * 64, **{k: v for k, v in change.items() if k != "dataset"}}
    bad = _shard(rng, change.get("dataset", "a"), **kw)
    paths = [_write(tmp_path, f"s{i}.gguf", s) for i, s in enumerate([*good, bad])]
    out = tmp_path / "merged.gguf"
    with pytest.raises(ImatrixError, match=message):
        merge_shards(paths, ["a", "a", "a"], str(out))
    assert not out.exists()


def test_merge_refuses_files_without_provenance(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    s = _shard(rng, "a")
    s.provenance = Provenance()
    p = _write(tmp_path, "s.gguf", s)
    with pytest.raises(ImatrixError, match="no provenance"):
        merge_shards([p], ["a"], str(tmp_path / "m.gguf"))


def test_merge_runs_the_health_check(tmp_path: Path) -> None:
    """A dead expert is a warning by default (the merge goes on) and stops the merge,
    with nothing written, when the config raises it to a failure."""
    rng = np.random.default_rng(3)
    s = _shard(rng, "a")
    s.entries["blk.0.ffn_up_exps.weight"].counts[:] = [5.0, 0.0, 7.0]
    p = _write(tmp_path, "s.gguf", s)
    ok = tmp_path / "ok.gguf"
    merge_shards([p], ["a"], str(ok), health={})
    assert ok.exists()
    out = tmp_path / "m.gguf"
    with pytest.raises(ImatrixError, match=r"health check failed .*never"):
        merge_shards([p], ["a"], str(out), health={"fail_on": ["dead_experts"]})
    assert not out.exists()


def test_collect_shard_discards_checkpoint_of_an_older_config(
    tmp_path: Path, dense_model: Path, calib_text: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A job killed under one config and rerun under another (here n_ctx) starts its
    shard over instead of failing on the stale checkpoint; the CLI keeps refusing it."""
    import subprocess
    import sys

    from imatrix.collect import checkpoint_path
    from imatrix.tokenize import tokenize_file

    tokens = tmp_path / "tok.npy"
    tokenize_file(dense_model, calib_text, tokens)
    kw = dict(
        dataset="alpha",
        shard=0,
        shards=1,
        chunks_per_shard=None,
        chunks=4,
        n_batch=64,
        n_ubatch=64,
        process_output=False,
        ppl=False,
        ngl=0,
        threads=1,
        output_frequency=1,
    )
    out = tmp_path / "shard.gguf"
    code = (
        "import sys; from imatrix.workflow.steps import collect_shard; "
        f"collect_shard(sys.argv[1], sys.argv[2], sys.argv[3], n_ctx=64, **{kw!r})"
    )
    env = {**os.environ, "IMATRIX_FAULT": "collect.checkpointed@2"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(dense_model), str(tokens), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert checkpoint_path(out).is_file() and not out.exists()

    with caplog.at_level("WARNING"):
        collect_shard(str(dense_model), str(tokens), str(out), n_ctx=32, **kw)
    assert "different settings" in caplog.text
    assert not checkpoint_path(out).exists()
    fresh = tmp_path / "fresh.gguf"
    collect_shard(str(dense_model), str(tokens), str(fresh), n_ctx=32, **kw)
    assert out.read_bytes() == fresh.read_bytes()


# --- resources ------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
#: what the SLURM profile may set per rule: site settings, never the rules' requests
SITE_RESOURCES = {
    "slurm_partition",
    "slurm_account",
    "qos",
    "slurm_extra",
    "gpu_model",
    "constraint",
    "gres",
}


def test_resources_grow_with_the_attempt_except_collect_runtime() -> None:
    first = resources.mem_mb("collect", 500.0)
    assert first == 2 * 500 + resources.MEM_OVERHEAD_MB
    assert resources.mem_mb("collect", 500.0, attempt=2) == 2 * first
    assert resources.mem_mb("evaluate", 0.0) == 1 + resources.MEM_OVERHEAD_MB
    # a collect job resumes from its checkpoint: the same time limit on every attempt
    assert resources.runtime_min("collect", 3) == resources.runtime_min("collect", 1)
    assert resources.runtime_min("quantize", 2) == 2 * resources.runtime_min("quantize", 1)
    assert [resources.gpu_count(n) for n in (0, 1, 99)] == [0, 1, 1]
    with pytest.raises(ImatrixError, match="no resources defined for step 'nope'"):
        resources.mem_mb("nope", 1.0)


def _cluster_rules() -> dict[str, str]:
    """Rule name -> body of every rule that is not a local rule."""
    text = "\n".join(p.read_text() for p in sorted((ROOT / "workflow/rules").glob("*.smk")))
    local = set(re.findall(r"^    (\w+),$", text, re.M))
    blocks = re.split(r"^(?=(?:rule|checkpoint|use rule) )", text, flags=re.M)
    rules = {}
    for block in blocks:
        m = re.match(r"(?:rule|checkpoint) (\w+):", block)
        if m and m.group(1) not in local:
            rules[m.group(1)] = block
    return rules


def test_rules_take_their_resources_from_the_library() -> None:
    rules = _cluster_rules()
    assert set(rules) == set(resources.STEPS)
    for name, body in rules.items():
        assert f'mem_mb=get_mem_mb("{name}")' in body, name
        assert f'runtime=get_runtime("{name}")' in body, name
    for name in ("collect", "evaluate"):
        assert "gpu=get_gpu(" in rules[name], name


def test_slurm_profile_adds_only_site_settings() -> None:
    profile = yaml.safe_load((ROOT / "profiles/slurm/config.yaml").read_text())
    assert set(profile.get("default-resources") or {}) <= SITE_RESOURCES
    for rule, res in profile["set-resources"].items():
        assert set(res) <= SITE_RESOURCES, (rule, res)
    # the signal ahead of the time limit goes to the collector's job step, not only to
    # the batch shell (B:), which would leave it KillWait seconds instead
    extra = profile["set-resources"]["collect"]["slurm_extra"]
    assert re.fullmatch(r"'--signal=TERM@\d+'", extra), extra


@pytest.mark.parametrize(
    "plans,message",
    [
        ([{"name": "Q4_K_M", "like": "Q2_K"}], r"plan name 'Q4_K_M' is a llama.cpp type name"),
        ([{"name": "iq4_nl", "like": "Q2_K"}], r"plan name 'iq4_nl' is a llama.cpp type name"),
        ([{"name": "f16", "target_bpw": 5}], r"plan name 'f16' is a llama.cpp type name"),
        ([{"name": "a", "like": "Q2_K", "target_size": 9}], r"\[0\] \(a\): give exactly one"),
        ([{"name": "a"}], r"give exactly one of like, target_bpw, target_size \(got none\)"),
        ([{"name": "a", "like": "Q2_K"}, {"name": "A", "like": "Q2_K"}], r"'A' is used twice"),
        ([{"name": "a", "like": "Q9_X"}], r"quantize.plans\[0\] \(a\): .*Q9_X"),
        ([{"name": "a", "like": "F16"}], r"not a quantized type"),
    ],
)
def test_check_plans_refuses(plans: list[dict], message: str) -> None:
    from imatrix.workflow.plans import check_plans

    with pytest.raises(ImatrixError, match=message):
        check_plans(plans)


def test_check_plans_accepts_each_budget() -> None:
    from imatrix.workflow.plans import check_plans, plan_budget

    plans = [
        {"name": "mix-Q4_K_M", "like": "q4_k_m"},
        {"name": "b", "target_bpw": 5.5},
        {"name": "c", "target_size": 10**8},
    ]
    check_plans(plans)
    assert [plan_budget(p).describe() for p in plans] == [
        {"like": "Q4_K_M"},
        {"target_bpw": 5.5},
        {"target_size": 10**8},
    ]
