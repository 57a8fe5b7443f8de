"""All shards of all datasets into the model's imatrix: checked, weighted, health-gated."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from imatrix.errors import ImatrixError
from imatrix.formats import read_imatrix, write_imatrix
from imatrix.model import ImatrixData, combine

log = logging.getLogger(__name__)


def _disagree(what: str, values: Mapping[str, object]) -> None:
    """Refuse files (path -> value) that do not all have the same value of ``what``."""
    by_value: dict[str, list[str]] = {}
    for p, v in values.items():
        by_value.setdefault(str(v), []).append(p)
    if len(by_value) > 1:
        detail = "; ".join(f"{v[:16]}: {', '.join(ps)}" for v, ps in by_value.items())
        raise ImatrixError(f"shards disagree on {what} ({detail})")


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
        _disagree(
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
    """Log the health report of the merged data; refuse it on a "fail" finding."""
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
