"""Quantize a GGUF model with an importance matrix, byte for byte as llama-quantize does.

Why through ``llama_model_quantize`` and not a quantizer of our own: the file users
publish must be exactly what llama.cpp makes (its type mixtures, fallbacks and
quantizers change between versions). What llama-quantize adds around that call is
reproduced here: the imatrix is loaded as per-tensor means
(:func:`imatrix.formats.load_means`), filtered by ``--include-weights`` /
``--exclude-weights`` (substring matches), and recorded in four ``quantize.imatrix.*``
metadata entries (file, first dataset, entry count, and the chunk count when above 0;
strings cut at 127 bytes), appended after the user's ``--override-kv`` entries in the
same order, so the output is byte-identical to ``llama-quantize --imatrix``.

The output is written atomically: llama.cpp writes a temporary file in the target
directory, which is renamed into place only after a successful run.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from imatrix.atomic import atomic_output
from imatrix.constants import (
    KEY_QUANTIZE_IMATRIX_DATASET,
    KEY_QUANTIZE_IMATRIX_FILE,
    KEY_QUANTIZE_IMATRIX_N_CHUNKS,
    KEY_QUANTIZE_IMATRIX_N_ENTRIES,
    parse_split_name,
    split_glob,
    split_name,
    split_paths,
)
from imatrix.errors import ImatrixError
from imatrix.formats import load_means
from imatrix.llama_api import llama_errors, llama_log_lines
from imatrix.qtypes import (
    GGML_TYPE_COUNT,
    GGML_TYPE_NAMES,
    GGML_TYPES,
    GGML_TYPES_ASSERT_IMATRIX,
    QUANT_TYPES,
    parse_ggml_type,
    parse_quant_type,
    requires_imatrix,
)

__all__ = [
    "GGML_TYPES",
    "QUANT_TYPES",
    "KVOverride",
    "QuantizeOptions",
    "parse_kv_override",
    "parse_tensor_type",
    "prepare_imatrix",
    "quantize",
    "quantize_dry_run",
    "read_tensor_type_file",
    "requires_imatrix",
]

log = logging.getLogger(__name__)

# llama_model_kv_override_type
KV_INT, KV_FLOAT, KV_BOOL, KV_STR = 0, 1, 2, 3
_KV_TAGS = {"int": KV_INT, "float": KV_FLOAT, "bool": KV_BOOL, "str": KV_STR}
#: ``char key[128]`` / ``char val_str[128]``: at most 127 bytes and the terminator
_KV_MAX = 127
#: what llama-quantize's ``file >> arg`` skips between tokens (C-locale ``isspace``)
_CXX_SPACE = re.compile(r"[ \t\n\v\f\r]+")


@dataclass(frozen=True)
class KVOverride:
    """One ``--override-kv KEY=TYPE:VALUE`` entry (type: int, float, bool or str)."""

    key: str
    tag: int
    value: int | float | bool | bytes

    def to_c(self, out: Any) -> None:
        """Fill ``out``, a llama_cpp ``llama_model_kv_override`` struct."""
        key = self.key.encode("utf-8")
        out.tag = self.tag
        out.key = key[:_KV_MAX]
        if self.tag == KV_INT:
            out.value.val_i64 = int(self.value)
        elif self.tag == KV_FLOAT:
            out.value.val_f64 = float(self.value)
        elif self.tag == KV_BOOL:
            out.value.val_bool = bool(self.value)
        else:
            assert isinstance(self.value, bytes)
            out.value.val_str = self.value[:_KV_MAX]


def parse_kv_override(text: str) -> KVOverride:
    """Parse ``KEY=TYPE:VALUE`` as llama.cpp's ``--override-kv`` does (stricter on values:
    ``int:abc`` is an error here, where ``atol`` would silently give 0)."""
    key, sep, rest = text.partition("=")
    if not sep or not key or len(key.encode("utf-8")) > _KV_MAX:
        raise ImatrixError(
            f"malformed --override-kv '{text}' (expected KEY=TYPE:VALUE, key < 128 bytes)"
        )
    kind, colon, value = rest.partition(":")
    if not colon or kind not in _KV_TAGS:
        raise ImatrixError(
            f"invalid type in --override-kv '{text}' (use int:, float:, bool: or str:)"
        )
    tag = _KV_TAGS[kind]
    try:
        if tag == KV_INT:
            return KVOverride(key, tag, int(value))
        if tag == KV_FLOAT:
            return KVOverride(key, tag, float(value))
    except ValueError:
        raise ImatrixError(f"invalid {kind} value in --override-kv '{text}'") from None
    if tag == KV_BOOL:
        if value not in ("true", "false"):
            raise ImatrixError(f"invalid boolean value for --override-kv '{text}' (true or false)")
        return KVOverride(key, tag, value == "true")
    raw = value.encode("utf-8")
    if len(raw) > _KV_MAX:
        raise ImatrixError(f"malformed --override-kv '{text}': value cannot exceed 127 bytes")
    return KVOverride(key, tag, raw)


def parse_tensor_type(text: str | tuple[str, str]) -> tuple[str, int]:
    """``NAME=TYPE`` (or a ``(name, type)`` pair) -> (lower-cased regex, ggml type id).

    llama-quantize lower-cases the name and llama.cpp matches it as a regular
    expression (``std::regex_search``) against each tensor name; the first match wins.
    """
    if isinstance(text, tuple):
        name, qtype = text
    else:
        name, sep, qtype = text.partition("=")
        if not sep:
            raise ImatrixError(f"malformed --tensor-type '{text}' (expected NAME=TYPE)")
    if not name:
        raise ImatrixError(f"missing tensor name in --tensor-type '{text}'")
    if not qtype:
        raise ImatrixError(f"missing quantization type in --tensor-type '{text}'")
    try:
        re.compile(name.lower())
    except re.error as exc:
        raise ImatrixError(
            f"invalid tensor name pattern in --tensor-type '{text}': {exc}"
        ) from None
    return name.lower(), parse_ggml_type(qtype, "tensor type in --tensor-type")


@dataclass
class PreparedImatrix:
    """What llama-quantize hands to the quantizer: means per tensor plus its metadata."""

    path: str
    means: dict[str, np.ndarray]
    datasets: list[str]
    chunk_count: int

    def kv_overrides(self) -> list[KVOverride]:
        """The ``quantize.imatrix.*`` entries, in llama-quantize's order."""
        out = [KVOverride(KEY_QUANTIZE_IMATRIX_FILE, KV_STR, self.path.encode("utf-8")[:_KV_MAX])]
        if self.datasets:
            out.append(
                KVOverride(
                    KEY_QUANTIZE_IMATRIX_DATASET, KV_STR, self.datasets[0].encode("utf-8")[:_KV_MAX]
                )
            )
        out.append(KVOverride(KEY_QUANTIZE_IMATRIX_N_ENTRIES, KV_INT, len(self.means)))
        if self.chunk_count > 0:
            out.append(KVOverride(KEY_QUANTIZE_IMATRIX_N_CHUNKS, KV_INT, self.chunk_count))
        return out


def prepare_imatrix(
    path: str | os.PathLike[str],
    include_weights: Sequence[str] = (),
    exclude_weights: Sequence[str] = (),
) -> PreparedImatrix:
    """Load the means and apply ``--exclude-weights`` then ``--include-weights``
    (each a substring of tensor names), as llama-quantize's ``prepare_imatrix`` does."""
    if include_weights and exclude_weights:
        raise ImatrixError("--include-weights and --exclude-weights cannot be used together")
    means, datasets, chunk_count = load_means(path)
    for sub in exclude_weights:
        means = {k: v for k, v in means.items() if sub not in k}
    if include_weights:
        means = {k: v for k, v in means.items() if any(sub in k for sub in include_weights)}
    if means:
        log.info("have %d importance matrix entries", len(means))
    return PreparedImatrix(os.fspath(path), means, datasets, chunk_count)


@dataclass
class QuantizeOptions:
    """llama-quantize's options, as ``llama_model_quantize_params`` takes them."""

    ftype: int
    only_copy: bool = False
    threads: int | None = None
    allow_requantize: bool = False
    leave_output_tensor: bool = False
    pure: bool = False
    output_tensor_type: int = GGML_TYPE_COUNT
    token_embedding_type: int = GGML_TYPE_COUNT
    tensor_types: list[tuple[str, int]] = field(default_factory=list)
    override_kv: list[KVOverride] = field(default_factory=list)
    keep_split: bool = False
    #: run llama.cpp's type selection only (``llama_model_quantize_params.dry_run``)
    dry_run: bool = False


class _Params:
    """The ctypes parameter block plus every buffer it points into (kept alive here)."""

    def __init__(self, opts: QuantizeOptions, imx: PreparedImatrix | None) -> None:
        import llama_cpp as lc

        p = lc.llama_model_quantize_default_params()
        p.nthread = int(opts.threads or 0)
        p.ftype = opts.ftype
        p.output_tensor_type = opts.output_tensor_type
        p.token_embedding_type = opts.token_embedding_type
        p.allow_requantize = opts.allow_requantize
        p.quantize_output_tensor = not opts.leave_output_tensor
        p.only_copy = opts.only_copy
        p.pure = opts.pure
        p.keep_split = opts.keep_split
        p.dry_run = opts.dry_run
        self._keep: list[object] = []
        kvs = list(opts.override_kv)
        if imx is not None and imx.means:
            arr = (lc.llama_model_imatrix_data * (len(imx.means) + 1))()
            for i, (name, vals) in enumerate(imx.means.items()):
                v = np.ascontiguousarray(vals, dtype=np.float32)
                bname = name.encode("utf-8")
                self._keep += [v, bname]
                arr[i].name = bname
                arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
                arr[i].size = v.size
            arr[len(imx.means)].name = None
            self._keep.append(arr)
            p.imatrix = arr
            kvs += imx.kv_overrides()
        if kvs:
            karr = (lc.llama_model_kv_override * (len(kvs) + 1))()
            for i, kv in enumerate(kvs):
                kv.to_c(karr[i])
            karr[len(kvs)].key = b""
            self._keep.append(karr)
            p.kv_overrides = karr
        if opts.tensor_types:
            tarr = (lc.llama_model_tensor_override * (len(opts.tensor_types) + 1))()
            for i, (pat, tid) in enumerate(opts.tensor_types):
                bpat = pat.encode("utf-8")
                self._keep.append(bpat)
                tarr[i].pattern = bpat
                tarr[i].type = tid
            tarr[len(opts.tensor_types)].pattern = None
            tarr[len(opts.tensor_types)].type = GGML_TYPE_COUNT
            self._keep.append(tarr)
            p.tt_overrides = tarr
        self.params = p
        self.imatrix_path = imx.path if imx is not None else None


def _guard_asserting_types(opts: QuantizeOptions, imx: PreparedImatrix | None) -> None:
    """Refuse combinations on which ggml aborts the whole process.

    ggml's quantizers for iq2_xxs, iq2_xs and iq1_s assert that importance data is
    present; llama.cpp checks that beforehand for most tensors, but not for the token
    embeddings and the output tensor, which an imatrix usually lacks.
    """
    means = imx.means if imx is not None else {}
    wanted: list[tuple[str, int]] = []
    if opts.token_embedding_type in GGML_TYPES_ASSERT_IMATRIX:
        wanted.append(("token_embd.weight", opts.token_embedding_type))
    if opts.output_tensor_type in GGML_TYPES_ASSERT_IMATRIX and not opts.leave_output_tensor:
        wanted.append(("output.weight", opts.output_tensor_type))
    for pat, tid in opts.tensor_types:
        if tid in GGML_TYPES_ASSERT_IMATRIX:
            for name in ("token_embd.weight", "output.weight"):
                if re.search(pat, name):
                    wanted.append((name, tid))
    for name, tid in wanted:
        if name not in means:
            raise ImatrixError(
                f"tensor '{name}' cannot be quantized to {GGML_TYPE_NAMES[tid]} without "
                "importance data for it (the imatrix has no entry for it)"
            )


def _model_tensor_names(base: Path) -> set[str] | None:
    """Tensor names of a model (all its splits), or None when they cannot be known
    here (then llama.cpp's own checks apply)."""
    from imatrix.gguf_io import read_gguf

    paths = split_paths(base)
    names: set[str] = set()
    for p in paths:
        try:
            names.update(t.name for t in read_gguf(p, load_data=False).tensors)
        except ImatrixError:
            return None
    return names


def _check_names_match(base: Path, imx: PreparedImatrix) -> None:
    """Refuse an imatrix none of whose entries is a tensor of the model (another
    architecture, renamed tensors): llama-quantize would quietly quantize without
    importance data, and the result would claim to have used it."""
    if not imx.means:
        return
    names = _model_tensor_names(base)
    if names is None or names & set(imx.means):
        return
    example = sorted(imx.means)[0]
    raise ImatrixError(
        f"{imx.path}: none of its {len(imx.means)} tensors is in {base} "
        f"(e.g. '{example}'); an imatrix of another model?"
    )


def _type_override(name: str | None, option: str) -> int:
    """The ggml type id of an ``--output-tensor-type``-like option; "none" if not given."""
    return GGML_TYPE_COUNT if name is None else parse_ggml_type(name, option)


def _split_prefix(output: Path) -> Path:
    """llama-quantize drops a trailing ``.gguf`` from the output name with ``--keep-split``."""
    s = str(output)
    return Path(s[: -len(".gguf")]) if s.endswith(".gguf") else output


def quantize(
    base: str | os.PathLike[str],
    output: str | os.PathLike[str],
    qtype: str,
    *,
    imatrix: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    allow_requantize: bool = False,
    leave_output_tensor: bool = False,
    pure: bool = False,
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    tensor_types: Iterable[str | tuple[str, str]] = (),
    include_weights: Sequence[str] = (),
    exclude_weights: Sequence[str] = (),
    override_kv: Iterable[str | KVOverride] = (),
    keep_split: bool = False,
) -> Path:
    """Quantize ``base`` to ``output`` as ``qtype`` (a llama-quantize type name).

    The same bytes as ``llama-quantize [options] [--imatrix IMATRIX] BASE OUTPUT QTYPE``
    with the same options; ``imatrix`` is recorded in the file as given (pass the same
    string llama-quantize would get). ``threads`` None or 0 uses every core. With
    ``keep_split`` the output is one file per input split, named
    ``OUTPUT-00001-of-0000N.gguf`` (a ``.gguf`` suffix of ``output`` is dropped first);
    the path of the first is returned. Raises :class:`ImatrixError` on any failure,
    with llama.cpp's own reason, and leaves no partial output behind.
    """
    canon, ftype = parse_quant_type(qtype)
    base_p, out_p = Path(base), Path(output)
    if not base_p.is_file():
        raise ImatrixError(f"{base_p}: no such model file")
    if out_p.exists() and out_p.resolve() == base_p.resolve():
        raise ImatrixError(f"input and output files are the same: '{base_p}'")
    opts = QuantizeOptions(
        ftype=ftype,
        only_copy=canon == "COPY",
        threads=threads,
        allow_requantize=allow_requantize,
        leave_output_tensor=leave_output_tensor,
        pure=pure,
        output_tensor_type=_type_override(output_tensor_type, "--output-tensor-type"),
        token_embedding_type=_type_override(token_embedding_type, "--token-embedding-type"),
        tensor_types=[parse_tensor_type(t) for t in tensor_types],
        override_kv=[
            kv if isinstance(kv, KVOverride) else parse_kv_override(kv) for kv in override_kv
        ],
        keep_split=keep_split,
    )
    if threads is not None and threads < 0:
        raise ImatrixError(f"threads must be >= 0, got {threads}")
    imx = None
    if imatrix is not None:
        imx = prepare_imatrix(imatrix, include_weights, exclude_weights)
        _check_names_match(base_p, imx)
    elif include_weights and exclude_weights:
        raise ImatrixError("--include-weights and --exclude-weights cannot be used together")
    _guard_asserting_types(opts, imx)
    params = _Params(opts, imx)
    using = f" using {threads} threads" if threads else ""
    log.info("quantizing '%s' to '%s' as %s%s", base_p, out_p, canon, using)
    if keep_split:
        return _run_split(base_p, _split_prefix(out_p), params)
    with atomic_output(out_p) as tmp:
        _run(base_p, Path(tmp), params, shown=out_p)
    return out_p


def quantize_dry_run(
    base: str | os.PathLike[str], opts: QuantizeOptions, imx: PreparedImatrix | None
) -> list[str]:
    """llama-quantize's dry run of ``base`` with ``opts`` (and the imatrix): llama.cpp's log
    lines, kept out of the user's log. Nothing is written.

    Why the log: the dry run runs the real type selection (the ftype's mix, overrides,
    fallbacks) but reports each tensor's resulting type only there
    (``[ i/ n] NAME - [shape], type = SRC, size = A MiB -> B MiB (TYPE)``).
    """
    import llama_cpp as lc

    params = _Params(replace(opts, dry_run=True), imx)
    with llama_errors() as errors, llama_log_lines(logging.DEBUG) as lines:
        rc = lc.llama_model_quantize(
            os.fsencode(Path(base)), b"dry-run.gguf", ctypes.byref(params.params)
        )
    if rc != 0:
        raise ImatrixError(f"{base}: llama.cpp's dry run failed: {_reason(errors)}")
    return lines


def read_tensor_type_file(path: str | os.PathLike[str]) -> list[str]:
    """The entries of a ``--tensor-type-file`` as llama-quantize reads them: tokens
    separated by ASCII whitespace only (Python's ``str.split`` would also split at
    Unicode spaces)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ImatrixError(f"{path}: no such file (--tensor-type-file)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ImatrixError(f"{path}: cannot read --tensor-type-file: {exc}") from None
    return [t for t in _CXX_SPACE.split(text) if t]


def _run(base: Path, out: Path, params: _Params, shown: Path | None = None) -> None:
    with llama_errors() as errors:
        rc = _quantize_call(base, out, params)
    if rc != 0:
        from imatrix.llama_api import model_file_problem

        problem = model_file_problem(base)
        if problem is not None:
            raise ImatrixError(problem)
        reason = _reason(errors)
        if "iostream error" in reason:  # llama.cpp's std::ofstream could not write
            raise ImatrixError(
                f"{shown or out}: writing the quantized model failed (disk full or file "
                f"size limit?): {reason}"
            )
        if "imatrix size" in reason and params.imatrix_path:  # an imatrix of another model
            raise ImatrixError(f"{params.imatrix_path}: does not fit {base}: {reason}")
        raise ImatrixError(f"{base}: quantization failed: {reason}")


def _quantize_call(base: Path, out: Path, params: _Params) -> int:
    import llama_cpp as lc

    return int(
        lc.llama_model_quantize(os.fsencode(base), os.fsencode(out), ctypes.byref(params.params))
    )


def _reason(errors: list[str]) -> str:
    for line in reversed(errors):
        if "failed to quantize:" in line:
            return line.split("failed to quantize:", 1)[1].strip()
    text = " ".join(" ".join(errors).split())
    return text or "llama.cpp reported an error (see the log)"


def _run_split(base: Path, prefix: Path, params: _Params) -> Path:
    """``--keep-split``: llama.cpp names the shards itself, so it writes them under a
    temporary prefix in the target directory; each complete shard is then renamed."""
    parent = prefix.parent if str(prefix.parent) else Path(".")
    if not parent.is_dir():
        raise ImatrixError(f"{prefix}: output directory {parent} does not exist")
    fd, tmp_marker = tempfile.mkstemp(prefix=f".{prefix.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp_prefix = tmp_marker[: -len(".tmp")]
    try:
        with llama_errors() as errors:
            rc = _quantize_call(base, Path(tmp_prefix), params)
        shards = sorted(glob.glob(split_glob(tmp_prefix)))
        if rc != 0:
            raise ImatrixError(f"{base}: quantization failed: {_reason(errors)}")
        if not shards:
            raise ImatrixError(f"{base}: quantization wrote no output shards")
        finals = []
        for shard in shards:
            parsed = parse_split_name(Path(shard).name)
            assert parsed is not None
            with open(shard, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(shard, 0o644)
            finals.append((shard, Path(split_name(str(prefix), *parsed[1:]))))
        for shard, final in finals:
            os.replace(shard, final)
        return finals[0][1]
    finally:
        for leftover in glob.glob(split_glob(tmp_prefix)):
            with contextlib.suppress(OSError):
                os.unlink(leftover)
        with contextlib.suppress(OSError):
            os.unlink(tmp_marker)
