"""Health check of an imatrix: is it safe to quantize with, and did the calibration data
exercise the model?

Why a separate, pure function: the workflow's merge rule, ``imatrix check`` and users'
own scripts all need the same verdict. :func:`check_imatrix` only inspects data and
returns a :class:`HealthReport`; :func:`format_report` turns it into text. Nothing here
reads files or exits.

What is checked (each finding has a *check* code and a level, ``warn`` or ``fail``):

``non_finite`` (fail)
    NaN or Inf in the sums of squares, the activation sums or the counts. llama-quantize
    would feed them to the quantizer's weighting and produce garbage.
``negative`` (fail)
    Negative sums of squares or counts: no collector can produce them.
``no_data`` (fail)
    A tensor whose every count is zero. llama-imatrix drops it when writing ``.dat``;
    low-bit quants then stop with "Missing importance matrix".
``dead_experts`` (warn)
    Experts that never fired (count 0), with their share per tensor. llama-quantize
    uses a flat importance of 1.0 for them: those experts are quantized blind.
``expert_coverage`` (warn)
    Experts that were routed fewer than ``min_expert_tokens`` tokens (0, the default,
    reports none), with each one's count and what llama-quantize makes of it: flat
    importance 1 for a count of 0, the few tokens' means as they are for a low count
    (see :mod:`imatrix.coverage`). The report also carries the coverage summary.
``zero_channels`` (warn)
    Input channels whose sum of squares is exactly 0 in an expert that did fire.
``few_tokens`` (warn)
    Experts (or dense tensors) that saw fewer than ``min_tokens`` tokens: their
    per-channel means rest on too few samples to rank channels.
``no_metadata`` (fail)
    A GGUF imatrix lacking ``imatrix.datasets``/``chunk_count``/``chunk_size``:
    llama-quantize refuses it ("missing imatrix metadata").
``missing_tensor`` (warn) and ``size_mismatch`` (fail), only with ``expected``
    Model weights the imatrix has no entry for (llama-quantize: "did not find weights"),
    and entries whose size differs from the weight's ``ne[0]·ne[2]`` (llama-quantize
    aborts).

``fail_on`` promotes checks to ``fail`` (the word ``warn`` promotes all of them);
``warn_on`` demotes checks to ``warn``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from imatrix.coverage import (
    DEFAULT_MIN_EXPERT_TOKENS,
    QUANTIZE_LOW,
    QUANTIZE_ZERO,
    expert_tokens,
    summary,
    summary_line,
)
from imatrix.errors import ImatrixError
from imatrix.jsonout import dumps
from imatrix.model import Entry, ImatrixData
from imatrix.stats import lround_counts

WARN = "warn"
FAIL = "fail"

#: check code -> default level
CHECKS: dict[str, str] = {
    "non_finite": FAIL,
    "negative": FAIL,
    "no_data": FAIL,
    "no_metadata": FAIL,
    "size_mismatch": FAIL,
    "dead_experts": WARN,
    "expert_coverage": WARN,
    "zero_channels": WARN,
    "few_tokens": WARN,
    "missing_tensor": WARN,
}

#: Below this many tokens per expert the per-channel means are too noisy to rank
#: channels: a quarter of a typical 512-token chunk, and what a 4-chunk run gives a
#: rarely routed expert.
DEFAULT_MIN_TOKENS = 128


@dataclass
class Finding:
    """One problem: which check, how bad, where, and a sentence a user can act on."""

    check: str
    level: str
    message: str
    tensor: str | None = None
    #: the measured quantity (share of dead experts, zero channels, tokens, ...)
    value: float | None = None


@dataclass
class HealthReport:
    source: str
    n_tensors: int
    n_experts: int
    findings: list[Finding] = field(default_factory=list)
    #: :func:`imatrix.coverage.summary` of a MoE imatrix, None without expert tensors
    coverage: dict[str, Any] | None = None

    @property
    def failed(self) -> bool:
        return any(f.level == FAIL for f in self.findings)

    @property
    def ok(self) -> bool:
        return not self.failed

    def count(self, level: str) -> int:
        return sum(1 for f in self.findings if f.level == level)

    def by_check(self, check: str) -> list[Finding]:
        return [f for f in self.findings if f.check == check]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "source": self.source,
            "status": FAIL if self.failed else (WARN if self.findings else "ok"),
            "tensors": self.n_tensors,
            "experts": self.n_experts,
            "failures": self.count(FAIL),
            "warnings": self.count(WARN),
            "findings": [asdict(f) for f in self.findings],
        }
        if self.coverage is not None:  # MoE only: a dense model's report stays as it was
            d["coverage"] = self.coverage
        return d


def resolve_levels(fail_on: Iterable[str] = (), warn_on: Iterable[str] = ()) -> dict[str, str]:
    """Levels per check after promotions/demotions; unknown names raise ValueError."""
    levels = dict(CHECKS)
    fail_on, warn_on = list(fail_on), list(warn_on)
    for name in [*fail_on, *warn_on]:
        if name != WARN and name not in CHECKS:
            raise ValueError(
                f"unknown check '{name}' (known: {', '.join(sorted(CHECKS))}, or 'warn' for all)"
            )
    for name in warn_on:
        for c in CHECKS if name == WARN else [name]:
            levels[c] = WARN
    for name in fail_on:
        for c in CHECKS if name == WARN else [name]:
            levels[c] = FAIL
    return levels


#: one finding before its level is known: (check, message, tensor, value)
_Raw = tuple[str, str, str | None, float | None]


def check_imatrix(
    data: ImatrixData,
    *,
    source: str = "imatrix",
    min_tokens: int = DEFAULT_MIN_TOKENS,
    fail_on: Iterable[str] = (),
    warn_on: Iterable[str] = (),
    expected: Mapping[str, int] | None = None,
    min_expert_tokens: int = DEFAULT_MIN_EXPERT_TOKENS,
) -> HealthReport:
    """Inspect ``data`` and report problems (see the module docstring for the checks).

    ``expected`` maps model weight names to the imatrix size llama-quantize expects for
    them (``ne[0]·ne[2]``, see :func:`expected_from_model`); without it the model-based
    checks are skipped. Pure: reads nothing, prints nothing.
    """
    levels = resolve_levels(fail_on, warn_on)
    tokens = expert_tokens(data)
    report = HealthReport(
        source=source,
        n_tensors=len(data.entries),
        n_experts=data.n_experts(),
        coverage=summary(tokens, min_expert_tokens),
    )
    raw: list[_Raw] = []
    if not data.is_legacy and not data.has_metadata:
        raw.append(
            (
                "no_metadata",
                "GGUF imatrix lacks imatrix.datasets/chunk_count/chunk_size: "
                "llama-quantize refuses it",
                None,
                None,
            )
        )
    for name in sorted(data.entries):
        raw.extend(_entry_findings(name, data.entries[name], min_tokens))
    raw.extend(_coverage_findings(tokens, min_expert_tokens))
    if expected is not None:
        raw.extend(_model_findings(data, expected))
    for check, message, tensor, value in raw:
        report.findings.append(Finding(check, levels[check], message, tensor, value))
    return report


def _entry_findings(name: str, e: Entry, min_tokens: int) -> Iterator[_Raw]:
    """Values that are not finite or negative, then the token counts' findings."""
    arrays = {"sums of squares": e.values, "counts": e.counts}
    if e.sums is not None:
        arrays["activation sums"] = e.sums
    bad = {k: int(np.count_nonzero(~np.isfinite(v))) for k, v in arrays.items()}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        what = ", ".join(f"{v} in {k}" for k, v in bad.items())
        yield "non_finite", f"non-finite values (NaN/Inf): {what}", name, float(sum(bad.values()))
    neg = int(np.count_nonzero(e.values < 0)) + int(np.count_nonzero(e.counts < 0))
    if neg:
        yield "negative", f"{neg} negative sums of squares or counts", name, float(neg)
    counts = lround_counts(np.nan_to_num(e.counts, nan=0.0, posinf=0.0, neginf=0.0))
    live = counts > 0
    if not live.any():
        yield "no_data", "no tokens reached this tensor (all counts are 0)", name, 0.0
        return
    yield from _count_findings(name, e, counts, live, min_tokens)


def _count_findings(
    name: str, e: Entry, counts: np.ndarray, live: np.ndarray, min_tokens: int
) -> Iterator[_Raw]:
    """Experts that never fired, channels that never activated, too few tokens."""
    if int(live.sum()) < e.n_counts:
        dead = np.flatnonzero(~live)
        share = dead.size / e.n_counts
        msg = f"{dead.size} of {e.n_counts} experts never fired ({100 * share:.1f}%): "
        yield "dead_experts", msg + _ids(dead), name, share
    mat = e.values.reshape(e.n_counts, e.row_size)[live]
    zero = int(np.count_nonzero(mat == 0))
    if zero:
        share = zero / mat.size
        msg = (
            f"{zero} of {mat.size} channels of active experts have zero activation "
            f"({100 * share:.2f}%)"
        )
        yield "zero_channels", msg, name, share
    few = live & (counts < min_tokens)
    if few.any():
        low = int(counts[few].min())
        who = (
            "tensor"
            if e.n_counts == 1
            else f"{int(few.sum())} experts ({_ids(np.flatnonzero(few))})"
        )
        msg = f"{who} saw fewer than {min_tokens} tokens (lowest: {low})"
        yield "few_tokens", msg, name, float(low)


def _coverage_findings(tokens: Mapping[str, np.ndarray], min_expert_tokens: int) -> Iterator[_Raw]:
    """Experts routed fewer than ``min_expert_tokens`` tokens, each with its count, and
    what llama-quantize makes of them (count 0 and low counts differ)."""
    for name, counts in tokens.items():
        low = np.flatnonzero(counts < min_expert_tokens)
        if not low.size:
            continue
        shown = ", ".join(f"#{int(i)} ({int(counts[i])})" for i in low[:_ID_LIMIT])
        more = f", ... ({low.size - _ID_LIMIT} more)" if low.size > _ID_LIMIT else ""
        what = [QUANTIZE_ZERO] if (counts[low] == 0).any() else []
        what += [QUANTIZE_LOW] if (counts[low] > 0).any() else []
        msg = (
            f"{low.size} of {counts.size} experts saw fewer than {min_expert_tokens} tokens: "
            f"{shown}{more}; {'; '.join(what)}"
        )
        yield "expert_coverage", msg, name, float(counts[low].min())


def min_expert_tokens_value(value: object, key: str) -> int:
    """``value`` as a count of tokens, or an ImatrixError naming ``key`` (the CLI option
    or config key it came from): a non-negative integer, not a bool or a float."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ImatrixError(f"{key} must be a non-negative integer, got {value!r}")
    return int(value)


def _model_findings(data: ImatrixData, expected: Mapping[str, int]) -> Iterator[_Raw]:
    """Model weights without an entry, and entries of the wrong size."""
    for wname in sorted(expected):
        size = expected[wname]
        e = data.entries.get(wname)
        if e is None:
            msg = "model weight has no imatrix entry (did not find weights)"
            yield "missing_tensor", msg, wname, None
        elif e.values.size != size:
            msg = f"imatrix entry has {e.values.size} values, the model weight needs {size}"
            yield "size_mismatch", msg, wname, float(e.values.size)


#: experts named in one finding before "... (N more)"
_ID_LIMIT = 12


def _ids(idx: np.ndarray, limit: int = _ID_LIMIT) -> str:
    shown = ", ".join(str(int(i)) for i in idx[:limit])
    return f"#{shown}" + (f", ... ({idx.size - limit} more)" if idx.size > limit else "")


def expected_from_model(path: str) -> dict[str, int]:
    """Weights of a model GGUF that llama-imatrix collects data for, with the imatrix
    size llama-quantize expects (``ne[0]·ne[2]``).

    These are the matrices inside blocks (``blk.N.*.weight`` with at least two
    dimensions), the inputs of the matrix multiplications llama-imatrix observes.
    """
    from imatrix.gguf_io import read_gguf

    g = read_gguf(path, load_data=False)
    out: dict[str, int] = {}
    for t in g.tensors:
        ne = tuple(t.ne)
        if t.name.startswith("blk.") and t.name.endswith(".weight") and len(ne) >= 2 and ne[1] > 1:
            out[t.name] = int(ne[0]) * (int(ne[2]) if len(ne) > 2 else 1)
    return out


def format_report(report: HealthReport, *, as_json: bool = False) -> str:
    """The report as text for people (grouped by check) or as JSON."""
    if as_json:
        return dumps(report.to_dict(), indent=2) + "\n"
    d = report.to_dict()
    lines = [
        f"{report.source}: {d['status'].upper()} - {report.n_tensors} tensors, "
        f"{d['failures']} failures, {d['warnings']} warnings"
    ]
    if report.coverage is not None:
        lines.append(summary_line(report.coverage))
    order = sorted({f.check for f in report.findings}, key=lambda c: (CHECKS.get(c) != FAIL, c))
    for check in order:
        items = report.by_check(check)
        lines.append(f"[{items[0].level}] {check}: {len(items)} finding(s)")
        for f in items:
            where = f"{f.tensor}: " if f.tensor else ""
            lines.append(f"  {where}{f.message}")
    return "\n".join(lines) + "\n"
