"""The library side of the Snakemake workflow: config checks, dataset loading, sharding,
GPU slots, and the one function each workflow script calls.

Why in the library and not in the rules: a rule only names its files and calls one
function; everything that decides something (which chunks a shard gets, whether shards
may be merged, which GPU a job uses) is here, importable and tested without Snakemake.
This module imports no Snakemake and, at import time, no llama.cpp: the Snakemake
process imports it to validate the config, and a collect job must choose its GPU
(``CUDA_VISIBLE_DEVICES``) before llama.cpp initializes its backend.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imatrix.errors import ImatrixError
from imatrix.formats import atomic_write, read_imatrix, write_imatrix
from imatrix.model import ImatrixData, combine
from imatrix.qtypes import QUANT_TYPES, parse_quant_type, requires_imatrix

log = logging.getLogger(__name__)

#: Packaged model sources a config may name instead of a path.
MODEL_SOURCES = ("gemma-3-270m-q4_k_m",)

#: How records of a JSONL or Parquet dataset are joined into one text.
RECORD_SEPARATOR = "\n\n"

_FORMAT_BY_SUFFIX = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


# ---------------------------------------------------------------------------
# logging of a job


def job_logging(path: str | os.PathLike[str], level: int = logging.INFO) -> None:
    """Send everything a job prints to its Snakemake log file.

    Python logging, warnings and tracebacks, and also llama.cpp's own messages, which
    its C code writes to file descriptors 1 and 2: both are pointed at the log, so a
    failed job's log holds the whole story.
    """
    fh = open(path, "w", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as the job
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fh.fileno(), 1)
    os.dup2(fh.fileno(), 2)
    sys.stdout = sys.stderr = fh
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(fh)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)


# ---------------------------------------------------------------------------
# config


def canonical_quant_types(types: Sequence[str]) -> list[str]:
    """llama-quantize's spelling of each configured type, in config order, once each."""
    out: list[str] = []
    for t in types:
        try:
            canon, _ = parse_quant_type(t)
        except ImatrixError:
            raise ImatrixError(
                f"quantize.types: unknown quantization type '{t}' "
                f"(llama.cpp knows: {', '.join(QUANT_TYPES)})"
            ) from None
        if canon not in out:
            out.append(canon)
    return out


def types_without_imatrix(types: Sequence[str]) -> list[str]:
    """The types llama.cpp can also make without an imatrix (for the comparison)."""
    return [t for t in types if not requires_imatrix(t)]


def dataset_format(path: str, fmt: str = "auto") -> str:
    """``text``, ``jsonl`` or ``parquet``: as configured, or by the file's extension."""
    if fmt != "auto":
        return fmt
    return _FORMAT_BY_SUFFIX.get(Path(path).suffix.lower(), "text")


def _need_file(key: str, path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise ImatrixError(f"{key}: {path}: no such file")
    if not p.is_file():
        raise ImatrixError(f"{key}: {path}: not a regular file")


def check_config(config: Mapping[str, Any]) -> None:
    """What the schema cannot say: files exist, quant types are llama.cpp's.

    Run at workflow start-up (after the schema validation), so a bad config fails
    before any job with one message naming the key at fault.
    """
    for name, model in config["models"].items():
        if "path" in model:
            _need_file(f"models.{name}.path", model["path"])
        elif model.get("source") not in MODEL_SOURCES:
            raise ImatrixError(
                f"models.{name}.source: unknown source '{model.get('source')}' "
                f"(known: {', '.join(MODEL_SOURCES)})"
            )
    for name, ds in config["datasets"].items():
        _need_file(f"datasets.{name}.path", ds["path"])
    canonical_quant_types(config["quantize"]["types"])
    text = config["evaluate"].get("text")
    if text is not None:
        _need_file("evaluate.text", text)


def model_mem_mb(size_mb: float, factor: float) -> int:
    """Memory request of a job that loads a model of ``size_mb``: ``factor`` copies plus
    1 GiB for the runtime and buffers."""
    return int(max(size_mb, 1.0) * factor) + 1024


# ---------------------------------------------------------------------------
# datasets


def load_dataset_text(path: str | Path, fmt: str = "auto", text_column: str = "text") -> str:
    """The calibration text of a dataset file.

    Text files are read as UTF-8 as they are. JSONL and Parquet records are taken in
    file order, their ``text_column`` joined with a blank line: llama-imatrix calibrates
    on one stream of text, and a paragraph break is the most neutral seam between
    documents.
    """
    p = Path(path)
    kind = dataset_format(str(p), fmt)
    if kind == "text":
        try:
            return p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ImatrixError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        except OSError as exc:
            raise ImatrixError(f"{p}: cannot read: {exc.strerror or exc}") from exc
    records = (
        _jsonl_records(p, text_column) if kind == "jsonl" else _parquet_records(p, text_column)
    )
    if not records:
        raise ImatrixError(f"{p}: no records")
    return RECORD_SEPARATOR.join(records)


def _jsonl_records(path: Path, column: str) -> list[str]:
    out: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ImatrixError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise ImatrixError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ImatrixError(f"{path}:{i}: not a JSON object: {exc.msg}") from exc
        if not isinstance(rec, dict) or column not in rec:
            raise ImatrixError(f"{path}:{i}: record has no field '{column}'")
        if not isinstance(rec[column], str):
            raise ImatrixError(f"{path}:{i}: field '{column}' is not a string")
        out.append(rec[column])
    return out


def _parquet_records(path: Path, column: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ImatrixError(f"{path}: not a Parquet file: {exc}") from exc
    if column not in schema.names:
        raise ImatrixError(f"{path}: no column '{column}' (columns: {', '.join(schema.names)})")
    if not (
        pa.types.is_string(schema.field(column).type)
        or pa.types.is_large_string(schema.field(column).type)
    ):
        raise ImatrixError(f"{path}: column '{column}' is {schema.field(column).type}, not text")
    values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    if any(v is None for v in values):
        raise ImatrixError(f"{path}: column '{column}' has null values")
    return values


def write_dataset_text(
    path: str | Path, output: str | Path, *, fmt: str = "auto", text_column: str = "text"
) -> Path:
    """Extract a dataset's text into a UTF-8 file (atomically), for the tokenizer."""
    text = load_dataset_text(path, fmt, text_column)
    atomic_write(output, text.encode("utf-8"))
    log.info("%s: %d characters of text from %s", output, len(text), path)
    return Path(output)


# ---------------------------------------------------------------------------
# shards


def dataset_chunks(tokens: str | Path, n_ctx: int, limit: int | None = None) -> int:
    """Chunks of ``n_ctx`` tokens that collection takes from a tokens file, as
    llama-imatrix counts them (whole chunks only; at most ``limit``)."""
    n_tokens = int(np.load(tokens, mmap_mode="r").shape[0])
    n = n_tokens // n_ctx
    return min(n, limit) if limit else n


def shard_count(n_chunks: int, *, chunks_per_shard: int) -> int:
    """Shards of ``chunks_per_shard`` chunks needed for ``n_chunks`` (at least one)."""
    if chunks_per_shard < 1:
        raise ImatrixError(f"chunks per shard must be at least 1, got {chunks_per_shard}")
    return max(1, -(-n_chunks // chunks_per_shard))


def shard_range(
    n_chunks: int,
    shard: int,
    *,
    shards: int | None = None,
    chunks_per_shard: int | None = None,
    dataset: str = "dataset",
) -> tuple[int, int]:
    """The chunk range ``[first, last)`` of ``shard``.

    With ``chunks_per_shard`` consecutive blocks of that size (the last may be
    shorter); otherwise ``shards`` contiguous ranges whose sizes differ by at most one.
    Together the shards cover ``[0, n_chunks)`` exactly once, in order, which is what
    makes the merge equal to one unsharded collection.
    """
    if chunks_per_shard is not None:
        total = shard_count(n_chunks, chunks_per_shard=chunks_per_shard)
        first, last = shard * chunks_per_shard, min((shard + 1) * chunks_per_shard, n_chunks)
    else:
        if shards is None or shards < 1:
            raise ImatrixError(f"shards must be at least 1, got {shards}")
        total = shards
        first, last = shard * n_chunks // shards, (shard + 1) * n_chunks // shards
    if not 0 <= shard < total:
        raise ImatrixError(f"{dataset}: shard {shard} does not exist (there are {total})")
    if n_chunks < total or first >= last:
        raise ImatrixError(
            f"{dataset}: {n_chunks} chunk(s) cannot fill {total} shards "
            "(lower collect.shards, or give the dataset more text)"
        )
    return first, last


# ---------------------------------------------------------------------------
# GPU slots


def gpu_slot_count() -> int:
    """GPUs this machine has: ``IMATRIX_GPU_SLOTS`` if set, else the NVIDIA devices the
    driver lists (0 without a driver)."""
    env = os.environ.get("IMATRIX_GPU_SLOTS")
    if env is not None:
        try:
            return max(0, int(env))
        except ValueError:
            raise ImatrixError(f"IMATRIX_GPU_SLOTS must be a number, got '{env}'") from None
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


def default_slot_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"imatrix-gpu-slots-{os.getuid()}"


@contextlib.contextmanager
def claim_gpu(
    n_slots: int | None = None,
    *,
    slot_dir: str | Path | None = None,
    poll: float = 0.5,
    timeout: float | None = None,
) -> Iterator[int | None]:
    """Hold one GPU of this machine for the duration of the block.

    Snakemake's ``--resources gpu=N`` bounds how many GPU jobs run at once but does not
    say which device each gets; without this, all of them would pile onto device 0.
    Each slot is a lock file taken with ``flock`` (atomic, and released by the kernel
    when a killed job's process dies, so no stale claims); the claimed index becomes
    ``CUDA_VISIBLE_DEVICES``. When ``CUDA_VISIBLE_DEVICES`` is already set (SLURM's
    GPU allocation, or a user's choice) it is respected and nothing is claimed; with no
    GPUs nothing is claimed either. Yields the slot, or None.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        log.info("using CUDA_VISIBLE_DEVICES=%s as given", os.environ["CUDA_VISIBLE_DEVICES"])
        yield None
        return
    n = gpu_slot_count() if n_slots is None else n_slots
    if n <= 0:
        yield None
        return
    d = Path(slot_dir) if slot_dir is not None else default_slot_dir()
    d.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    waited = False
    while True:
        for slot in range(n):
            fd = os.open(d / f"gpu{slot}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.environ["CUDA_VISIBLE_DEVICES"] = str(slot)
            log.info("claimed GPU slot %d of %d (CUDA_VISIBLE_DEVICES=%d)", slot, n, slot)
            try:
                yield slot
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            return
        if timeout is not None and time.monotonic() - start > timeout:
            raise ImatrixError(f"no free GPU slot among {n} in {d} after {timeout:.0f} s")
        if not waited:
            log.info("all %d GPU slots busy; waiting for one", n)
            waited = True
        time.sleep(poll)


# ---------------------------------------------------------------------------
# the step functions the workflow scripts call


def collect_shard(
    model: str,
    tokens: str,
    output: str,
    *,
    dataset: str,
    shard: int,
    shards: int,
    chunks_per_shard: int | None,
    chunks: int | None,
    n_ctx: int,
    n_batch: int,
    n_ubatch: int,
    process_output: bool,
    ppl: bool,
    ngl: int,
    threads: int,
    output_frequency: int,
) -> Path:
    """Collect one shard: the chunk range this shard owns, on a GPU of its own when
    layers are offloaded, resuming from ``<output>.checkpoint`` if a previous run of
    this job was killed."""
    n = dataset_chunks(tokens, n_ctx, chunks)
    first, last = shard_range(
        n, shard, shards=shards, chunks_per_shard=chunks_per_shard, dataset=f"dataset '{dataset}'"
    )
    log.info("dataset %s shard %d: chunks [%d, %d) of %d", dataset, shard, first, last, n)
    with claim_gpu(None if ngl > 0 else 0):
        # after the GPU is chosen: llama.cpp loads here
        from imatrix.collect import CollectSettings, StaleCheckpoint, checkpoint_path, collect

        settings = CollectSettings(
            first_chunk=first,
            last_chunk=last,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_ubatch=n_ubatch,
            threads=threads,
            n_gpu_layers=ngl,
            process_output=process_output,
            compute_ppl=ppl,
            output_frequency=output_frequency,
            resume=True,
        )

        def run() -> None:
            collect(model, tokens, output, settings, dataset=dataset)

        try:
            run()
        except StaleCheckpoint as exc:
            # killed under an older config: that work is obsolete, start this shard over
            log.warning("%s; discarding it and collecting this shard from the start", exc)
            checkpoint_path(output).unlink(missing_ok=True)
            run()
    return Path(output)


def evaluate_quants(
    base: str,
    quants: Sequence[str],
    text: str,
    output: str,
    *,
    n_ctx: int,
    chunks: int | None,
    threads: int,
    ngl: int,
) -> Path:
    """Evaluate a model's quantizations against its base into one summary table
    (the base's logits are computed once for all of them), on a GPU of its own when
    layers are offloaded."""
    with claim_gpu(None if ngl > 0 else 0):
        from imatrix.evaluate import evaluate, write_summary

        df = evaluate(
            base, list(quants), text, n_ctx=n_ctx, chunks=chunks, threads=threads, n_gpu_layers=ngl
        )
        return write_summary(df, output)


def _provenance_errors(
    items: Sequence[ImatrixData], paths: Sequence[str], datasets: Sequence[str]
) -> None:
    """Refuse shards that cannot belong together (different model, dataset text,
    tokenizer settings or chunk size), naming the files that disagree."""

    def disagree(what: str, values: Mapping[str, object]) -> None:
        by_value: dict[str, list[str]] = {}
        for p, v in values.items():
            by_value.setdefault(str(v), []).append(p)
        if len(by_value) > 1:
            detail = "; ".join(f"{v[:16]}: {', '.join(ps)}" for v, ps in by_value.items())
            raise ImatrixError(f"shards disagree on {what} ({detail})")

    for p, d, it in zip(paths, datasets, items, strict=True):
        if it.datasets != [d]:
            raise ImatrixError(f"{p}: holds dataset(s) {it.datasets}, expected ['{d}']")
        if not it.provenance.model_sha256 or not it.provenance.dataset_sha256:
            raise ImatrixError(f"{p}: no provenance (model and dataset sha256); not a shard")
    disagree(
        "the model sha256",
        {p: it.provenance.model_sha256 for p, it in zip(paths, items, strict=True)},
    )
    disagree(
        "tokenizer settings",
        {p: it.provenance.tokenizer for p, it in zip(paths, items, strict=True)},
    )
    disagree("the chunk size", {p: it.chunk_size for p, it in zip(paths, items, strict=True)})
    for d in dict.fromkeys(datasets):
        disagree(
            f"the text of dataset '{d}' (sha256)",
            {
                p: it.provenance.dataset_sha256
                for p, it, dd in zip(paths, items, datasets, strict=True)
                if dd == d
            },
        )


def merge_shards(
    shards: Sequence[str],
    datasets: Sequence[str],
    output: str,
    *,
    weights: Mapping[str, float] | None = None,
    health: Mapping[str, Any] | None = None,
) -> Path:
    """Merge the partial imatrices of all datasets into one, with dataset weights.

    The merged data goes through the health check (:func:`imatrix.health.check_imatrix`,
    settings from the config's ``health`` block) before it is written: its report goes to
    the log, and a finding at level "fail" stops the merge with nothing written, so a
    broken imatrix never reaches the quantize jobs.

    ``datasets[i]`` names the dataset of ``shards[i]``. The sums and counts add as
    ``imatrix combine`` adds them (each shard scaled by its dataset's weight), so the
    result equals collecting each dataset in one job and combining those. The result
    lists each dataset once, in order, with its text's sha256.
    """
    if len(shards) != len(datasets):
        raise ImatrixError(f"{len(shards)} shards but {len(datasets)} dataset names")
    items = [read_imatrix(p) for p in shards]
    _provenance_errors(items, shards, datasets)
    w = weights or {}
    out = combine(items, weights=[float(w.get(d, 1.0)) for d in datasets], sources=list(shards))
    order = list(dict.fromkeys(datasets))
    out.datasets = order
    out.provenance.dataset_sha256 = [
        items[datasets.index(d)].provenance.dataset_sha256[0] for d in order
    ]
    out.provenance.version = items[0].provenance.version
    _health_gate(out, output, health or {})
    write_imatrix(out, output)
    log.info("merged %d shards of %d dataset(s) into %s", len(shards), len(order), output)
    return Path(output)


def _health_gate(data: ImatrixData, output: str, health: Mapping[str, Any]) -> None:
    from imatrix.health import DEFAULT_MIN_TOKENS, check_imatrix, format_report

    report = check_imatrix(
        data,
        source=output,
        min_tokens=int(health.get("min_tokens", DEFAULT_MIN_TOKENS)),
        fail_on=health.get("fail_on", ()),
        warn_on=health.get("warn_on", ()),
    )
    for line in format_report(report).splitlines():
        log.info("health: %s", line)
    if report.failed:
        bad = [f for f in report.findings if f.level == "fail"]
        raise ImatrixError(
            f"{output}: health check failed ({len(bad)} finding(s), first: {bad[0].message}); "
            "see the merge log, or lower the check with health.warn_on"
        )


def convert_imatrix(src: str, output: str, *, output_format: str, compat: bool) -> Path:
    """The merged imatrix in another format, exactly as ``imatrix convert`` writes it."""
    data = read_imatrix(src)
    out = combine([data], sources=[src])
    out.provenance = data.provenance
    out.provenance.chunk_reached = None
    write_imatrix(out, output, output_format=output_format, compat=compat)
    return Path(output)


def imatrix_statistics(src: str, tensors: str, layers: str, plots: str) -> None:
    """Per-tensor and per-layer statistics of an imatrix as Parquet, and its plots."""
    from imatrix.plots import write_plots
    from imatrix.stats import compute_statistics, write_parquet

    data = read_imatrix(src)
    t, lay = compute_statistics(data)
    tp, lp = write_parquet(t, lay, Path(tensors).parent)
    if (str(tp), str(lp)) != (str(Path(tensors)), str(Path(layers))):
        raise ImatrixError(f"statistics tables must be named {tp.name} and {lp.name}")
    Path(plots).mkdir(parents=True, exist_ok=True)
    write_plots(data, t, plots)


def _html_table(df: Any, title: str) -> str:
    return f"<h2>{title}</h2>\n" + df.to_html(
        index=False, na_rep="", float_format=lambda v: f"{v:.6g}"
    )


def write_html_report(output: str, title: str, tables: Mapping[str, str]) -> Path:
    """One HTML page with Parquet tables (Snakemake's report shows HTML inline)."""
    import pandas as pd

    parts = [
        "<!DOCTYPE html>",
        f"<html><head><meta charset='utf-8'><title>{title}</title>",
        "<style>body{font-family:sans-serif}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}</style></head><body>",
        f"<h1>{title}</h1>",
    ]
    for name, path in tables.items():
        parts.append(_html_table(pd.read_parquet(path), name))
    parts.append("</body></html>")
    atomic_write(output, "\n".join(parts).encode("utf-8"))
    return Path(output)
