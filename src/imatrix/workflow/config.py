"""What the config schema cannot say: files exist, quant types are llama.cpp's, plans
have one budget and names of their own.

Run at workflow start-up, after the schema validation, so that a bad config fails
before any job with one message naming the key at fault.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from imatrix.constants import DEFAULT_EVAL_SET
from imatrix.convergence import StopRule, parse_stop_rule
from imatrix.errors import ImatrixError
from imatrix.hashing import sha256_file
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


def check_until_converged(value: object) -> StopRule | None:
    """``collect.until_converged``: null (off), EPS, or "EPS[:PATIENCE]" as on the CLI."""
    if value is None:
        return None
    text = str(value) if isinstance(value, (int, float, str)) and value is not True else ""
    try:
        return parse_stop_rule(text)
    except ValueError as exc:
        raise ImatrixError(f"collect.until_converged: {exc}") from None


def check_config(config: Mapping[str, Any], *, check_chat: bool = True) -> None:
    """Refuse a config whose files are missing or whose models or types are unknown.

    ``check_chat=False`` leaves out the chat datasets' records and templates (see
    :func:`~imatrix.workflow.model_datasets.check_model_datasets`), the one check that
    opens model files: every cluster job reads the workflow again, and the job that
    renders a chat dataset checks the same before it writes anything."""
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
    check_model_datasets(config["datasets"], config["models"], check_chat=check_chat)
    check_until_converged(config.get("collect", {}).get("until_converged"))
    canonical_quant_types(config["quantize"]["types"])
    check_plans(config["quantize"].get("plans") or [])
    for t in (config["quantize"].get("planner") or {}).get("types") or []:
        parse_ggml_type(t, "quantize.planner.types")
    _check_eval_sets(config)


def eval_sets(evaluate: Mapping[str, Any]) -> dict[str, str]:
    """The evaluation texts by set name: ``evaluate.texts``, or ``evaluate.text`` as the
    one set :data:`DEFAULT_EVAL_SET`; empty when the evaluation is off."""
    if evaluate.get("texts"):
        return dict(evaluate["texts"])
    text = evaluate.get("text")
    return {} if text is None else {DEFAULT_EVAL_SET: text}


def _eval_key(evaluate: Mapping[str, Any], name: str) -> str:
    return f"evaluate.texts.{name}" if evaluate.get("texts") else "evaluate.text"


def _check_eval_sets(config: Mapping[str, Any]) -> None:
    """Evaluation files exist and none is a calibration file: an evaluation on text the
    imatrix was made from would flatter the quants. Same content is compared by size,
    then sha256, so large datasets are hashed only when a size matches."""
    ev = config["evaluate"]
    if ev.get("text") is not None and ev.get("texts"):
        raise ImatrixError("evaluate: give either text or texts, not both")
    sets = eval_sets(ev)
    for name, path in sets.items():
        _need_file(_eval_key(ev, name), path)
    calib = {d: Path(ds["path"]) for d, ds in config["datasets"].items() if ds.get("path")}
    for name, path in sets.items():
        p = Path(path)
        for d, c in calib.items():
            same = c.resolve() == p.resolve() or (
                c.stat().st_size == p.stat().st_size and sha256_file(c) == sha256_file(p)
            )
            if same:
                raise ImatrixError(
                    f"{_eval_key(ev, name)}: {path} is the text of calibration dataset "
                    f"'{d}'; evaluate on held-out text"
                )


def schema_error(exc: BaseException) -> str:
    """One line for a config the schema refuses: the key's path and what is wrong
    (Snakemake's own message spans the whole schema of the key)."""
    err: BaseException | None = exc
    while err is not None:  # Snakemake raises its own error while handling jsonschema's
        path, message = getattr(err, "absolute_path", None), getattr(err, "message", None)
        if path is not None and isinstance(message, str):
            where = ".".join(str(k) for k in path)
            return f"{where}: {message}" if where else message
        err = err.__cause__ or err.__context__
    return str(exc).splitlines()[0]
