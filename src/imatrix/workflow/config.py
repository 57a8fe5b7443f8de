"""What the config schema cannot say: files exist, quant types are llama.cpp's, plans
have one budget and names of their own.

Run at workflow start-up, after the schema validation, so that a bad config fails
before any job with one message naming the key at fault.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from imatrix.convergence import StopRule, parse_stop_rule
from imatrix.errors import ImatrixError
from imatrix.qtypes import QUANT_TYPES, parse_ggml_type, parse_quant_type, requires_imatrix
from imatrix.workflow.model_datasets import check_model_datasets
from imatrix.workflow.plans import check_plans

#: Packaged model sources a config may name instead of a path.
MODEL_SOURCES = ("gemma-3-270m-q4_k_m",)


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


def _need_file(key: str, path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise ImatrixError(f"{key}: {path}: no such file")
    if not p.is_file():
        raise ImatrixError(f"{key}: {path}: not a regular file")


def schema_error_line(exc: BaseException) -> str:
    """One line naming the config key and what is wrong with it, for a schema violation.

    Snakemake's ``validate`` prints jsonschema's whole report (the schema fragment, the
    instance) over a dozen lines; users need the key and the reason, as for every other
    bad input. The jsonschema error is the context of Snakemake's ``WorkflowError``.
    """
    cause = exc.__context__ if exc.__context__ is not None else exc
    message = getattr(cause, "message", None)
    if message is None:
        return str(exc).splitlines()[0]
    path = ".".join(str(p) for p in getattr(cause, "absolute_path", ())) or "(top level)"
    return f"{path}: {message}"


def check_until_converged(value: object) -> StopRule | None:
    """``collect.until_converged``: null (off), EPS, or "EPS[:PATIENCE]" as on the CLI."""
    if value is None:
        return None
    text = str(value) if isinstance(value, (int, float, str)) and value is not True else ""
    try:
        return parse_stop_rule(text)
    except ValueError as exc:
        raise ImatrixError(f"collect.until_converged: {exc}") from None


def check_config(config: Mapping[str, Any]) -> None:
    """Refuse a config whose files are missing or whose models or types are unknown."""
    for name, model in config["models"].items():
        if "path" in model:
            _need_file(f"models.{name}.path", model["path"])
        elif model.get("source") not in MODEL_SOURCES:
            raise ImatrixError(
                f"models.{name}.source: unknown source '{model.get('source')}' "
                f"(known: {', '.join(MODEL_SOURCES)})"
            )
    for name, ds in config["datasets"].items():
        if "path" in ds:
            _need_file(f"datasets.{name}.path", ds["path"])
    check_model_datasets(config["datasets"], config["models"])
    check_until_converged(config.get("collect", {}).get("until_converged"))
    canonical_quant_types(config["quantize"]["types"])
    check_plans(config["quantize"].get("plans") or [])
    for t in (config["quantize"].get("planner") or {}).get("types") or []:
        parse_ggml_type(t, "quantize.planner.types")
    text = config["evaluate"].get("text")
    if text is not None:
        _need_file("evaluate.text", text)
