"""All shards of all datasets into the model's imatrix: checked, weighted, health-gated."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from imatrix.constants import (
    DEFAULT_CHUNK_SIZE,
    GENERAL_TYPE_IMATRIX,
    KEY_CHUNK_SIZE,
    KEY_DATASET_SELECTION,
    KEY_DATASET_SHA256,
    KEY_DATASETS,
    KEY_GENERAL_TYPE,
    KEY_MODEL_SHA256,
    KEY_TOKENIZER,
    KEY_VERSION,
    SUFFIX_IN_SUM2,
    GGUFValueType,
)
from imatrix.errors import ImatrixError
from imatrix.formats import FORMAT_GGUF, detect_format, read_imatrix, write_imatrix
from imatrix.gguf_io import GGUFFile, read_gguf
from imatrix.model import ImatrixData, Provenance, combine

log = logging.getLogger(__name__)


def _disagree(what: str, values: Mapping[str, object]) -> None:
    """Refuse files (path -> value) that do not all have the same value of ``what``."""
    by_value: dict[str, list[str]] = {}
    for p, v in values.items():
        by_value.setdefault(str(v), []).append(p)
    if len(by_value) > 1:
        detail = "; ".join(f"{v[:16]}: {', '.join(ps)}" for v, ps in by_value.items())
        raise ImatrixError(f"shards disagree on {what} ({detail})")


#: A GGUF key's type and, for arrays, element type.
_KeyType = tuple[GGUFValueType, GGUFValueType | None]


def _plain_header(g: GGUFFile) -> bool:
    """True when ``g`` looks like an imatrix whose header keys have the types we read."""
    string: _KeyType = (GGUFValueType.STRING, None)
    strings: _KeyType = (GGUFValueType.ARRAY, GGUFValueType.STRING)
    uint = (GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64)
    types: dict[str, list[_KeyType]] = {
        KEY_DATASETS: [strings],
        KEY_DATASET_SHA256: [strings],
        KEY_DATASET_SELECTION: [strings],
        KEY_MODEL_SHA256: [string],
        KEY_TOKENIZER: [string],
        KEY_VERSION: [string],
        KEY_CHUNK_SIZE: [(t, None) for t in uint],
    }
    return (
        g.get(KEY_GENERAL_TYPE) in (None, GENERAL_TYPE_IMATRIX)
        and any(t.name.endswith(SUFFIX_IN_SUM2) for t in g.tensors)
        and all(k not in g.kv or (g.kv[k].type, g.kv[k].elem_type) in ok for k, ok in types.items())
    )


def read_header(path: str) -> ImatrixData:
    """A shard's datasets, chunk size and provenance, without its tensors.

    Why: the provenance of every shard is checked before any is added, and the merge
    then reads one shard at a time, so this must not load the data. Anything unusual
    (a legacy file, a foreign or malformed GGUF) is read in full, so the error is the
    reader's own.
    """
    if detect_format(path) == FORMAT_GGUF:
        g = read_gguf(path, load_data=False)
        if _plain_header(g):
            return ImatrixData(
                datasets=list(g.get(KEY_DATASETS, [])),
                chunk_size=int(g.get(KEY_CHUNK_SIZE) or DEFAULT_CHUNK_SIZE),
                provenance=Provenance(
                    model_sha256=g.get(KEY_MODEL_SHA256),
                    dataset_sha256=list(g.get(KEY_DATASET_SHA256, [])),
                    tokenizer=g.get(KEY_TOKENIZER),
                    version=g.get(KEY_VERSION),
                    dataset_selection=list(g.get(KEY_DATASET_SELECTION, [])),
                ),
            )
    full = read_imatrix(path)
    full.entries = {}
    return full


def _provenance_errors(
    items: Sequence[ImatrixData], paths: Sequence[str], datasets: Sequence[str]
) -> None:
    """Refuse shards that cannot belong together (different model, dataset text,
    tokenizer settings or chunk size), naming the files that disagree."""
    for p, d, it in zip(paths, datasets, items, strict=True):
        if it.datasets != [d]:
            raise ImatrixError(f"{p}: holds dataset(s) {it.datasets}, expected ['{d}']")
        if not it.provenance.model_sha256 or not it.provenance.dataset_sha256:
            raise ImatrixError(f"{p}: no provenance (model and dataset sha256); not a shard")
    pairs = list(zip(paths, items, strict=True))
    _disagree("the model sha256", {p: it.provenance.model_sha256 for p, it in pairs})
    _disagree("tokenizer settings", {p: it.provenance.tokenizer for p, it in pairs})
    _disagree("the chunk size", {p: it.chunk_size for p, it in pairs})
    for d in dict.fromkeys(datasets):
        mine = [(p, it) for p, it, dd in zip(paths, items, datasets, strict=True) if dd == d]
        _disagree(
            f"the text of dataset '{d}' (sha256)",
            {p: it.provenance.dataset_sha256 for p, it in mine},
        )
        _disagree(f"the chunks chosen from dataset '{d}'", {p: it.selections() for p, it in mine})


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
    items = [read_header(p) for p in shards]
    _provenance_errors(items, shards, datasets)
    w = weights or {}
    out = combine(
        [partial(read_imatrix, p) for p in shards],  # one shard at a time
        weights=[float(w.get(d, 1.0)) for d in datasets],
        sources=list(shards),
    )
    order = list(dict.fromkeys(datasets))
    out.datasets = order
    out.provenance.dataset_sha256 = [
        items[datasets.index(d)].provenance.dataset_sha256[0] for d in order
    ]
    out.provenance.version = items[0].provenance.version
    chosen = [items[datasets.index(d)].selections()[0] for d in order]
    out.provenance.dataset_selection = chosen if any(chosen) else []
    _health_gate(out, output, health or {})
    write_imatrix(out, output)
    log.info("merged %d shards of %d dataset(s) into %s", len(shards), len(order), output)
    return Path(output)


def _health_gate(data: ImatrixData, output: str, health: Mapping[str, Any]) -> None:
    """Log the health report of the merged data; refuse it on a "fail" finding."""
    from imatrix.coverage import DEFAULT_MIN_EXPERT_TOKENS
    from imatrix.health import (
        DEFAULT_MIN_TOKENS,
        check_imatrix,
        format_report,
        min_expert_tokens_value,
    )

    min_expert = health.get("min_expert_tokens", DEFAULT_MIN_EXPERT_TOKENS)
    report = check_imatrix(
        data,
        source=output,
        min_tokens=int(health.get("min_tokens", DEFAULT_MIN_TOKENS)),
        fail_on=health.get("fail_on", ()),
        warn_on=health.get("warn_on", ()),
        min_expert_tokens=min_expert_tokens_value(min_expert, "health.min_expert_tokens"),
    )
    for line in format_report(report).splitlines():
        log.info("health: %s", line)
    if report.failed:
        bad = [f for f in report.findings if f.level == "fail"]
        raise ImatrixError(
            f"{output}: health check failed ({len(bad)} finding(s), first: {bad[0].message}); "
            "see the merge log, or lower the check with health.warn_on"
        )
