"""GGUF keys, tensor-name suffixes, ggml types and format constants, in one place.

Why here and not spelled out where they are used: readers, writers and tests can
then never disagree on a key's spelling or a type's size, and a llama.cpp change is a
one-line change. Everything gguf-py (``gguf.constants``, pinned in pyproject.toml)
defines is taken from it; what it lacks is supplemented below, each item named with
its source in the pinned llama.cpp, and tests/test_constants.py checks every ggml
type id against the loaded libggml (``ggml_type_name``, ``ggml_blck_size``,
``ggml_type_size``).
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGUFType, Keys
from gguf.constants import GGUF_DEFAULT_ALIGNMENT as GGUF_DEFAULT_ALIGNMENT
from gguf.constants import GGUF_MAGIC as _GGUF_MAGIC_U32
from gguf.constants import GGUF_VERSION as GGUF_VERSION
from gguf.constants import GGMLQuantizationType as GGMLQuantizationType
from gguf.constants import GGUFValueType as GGUFValueType
from gguf.gguf_writer import SHARD_NAME_FORMAT

# --- GGUF container -----------------------------------------------------------
#: the four magic bytes at the start of a GGUF file (gguf-py has them as a u32)
GGUF_MAGIC = _GGUF_MAGIC_U32.to_bytes(4, "little")

# --- ggml tensor types ----------------------------------------------------------
#: ggml type ids gguf-py 0.19.0 does not know (ggml.h ``enum ggml_type``), with their
#: (block size, bytes per block) from ggml.c ``type_traits`` and their names.
GGML_TYPE_Q2_0 = 42
_EXTRA_TYPES: dict[int, tuple[str, tuple[int, int]]] = {
    GGML_TYPE_Q2_0: ("q2_0", (64, 2 + 16)),
}
#: ``GGML_TYPE_COUNT`` (ggml.h): one past the largest id; "no override" in
#: ``llama_model_quantize_params``.
GGML_TYPE_COUNT = 43

#: sizes gguf-py 0.19.0 has wrong: Q8_1 (ggml-common.h ``block_q8_1``: two ggml_half
#: and 32 int8, 36 bytes; gguf-py says 40). ggml uses Q8_1 only inside its kernels.
_SIZE_FIXES: dict[int, tuple[int, int]] = {int(GGMLQuantizationType.Q8_1): (32, 2 + 2 + 32)}

#: every ggml type id a GGUF file may hold -> (block size, bytes per block)
GGML_TYPE_SIZES: dict[int, tuple[int, int]] = {
    **{int(t): size for t, size in GGML_QUANT_SIZES.items()},
    **{tid: size for tid, (_, size) in _EXTRA_TYPES.items()},
    **_SIZE_FIXES,
}


def ggml_type_name(type_id: int) -> str:
    """ggml's name of a type (``ggml_type_name``: ``q4_K``, ``iq2_xxs``, ``bf16``)."""
    if type_id in _EXTRA_TYPES:
        return _EXTRA_TYPES[type_id][0]
    name = GGMLQuantizationType(type_id).name.lower()
    # ggml keeps the K of the k-quants upper-case (q2_K ... q8_K)
    return name[:-2] + "_K" if name.endswith("_k") else name


def ggml_nbytes(type_id: int, ne: tuple[int, ...]) -> int | None:
    """Bytes of a tensor of shape ``ne`` (``ne[0]`` contiguous), or None for an unknown
    type or a row that is not a whole number of blocks (ggml refuses both)."""
    size = GGML_TYPE_SIZES.get(type_id)
    if size is None or not ne:
        return None
    blck, nbytes = size
    if ne[0] % blck:
        return None
    n = 1
    for d in ne:
        n *= d
    return n // blck * nbytes


# --- keys llama-imatrix writes (common/imatrix-loader.h) -----------------------
KEY_GENERAL_TYPE = Keys.General.TYPE
KEY_GENERAL_ARCHITECTURE = Keys.General.ARCHITECTURE
KEY_GENERAL_ALIGNMENT = Keys.General.ALIGNMENT
KEY_GENERAL_FILE_TYPE = Keys.General.FILE_TYPE
GENERAL_TYPE_IMATRIX = GGUFType.IMATRIX
KEY_DATASETS = Keys.IMatrix.DATASETS
KEY_CHUNK_COUNT = Keys.IMatrix.CHUNK_COUNT
KEY_CHUNK_SIZE = Keys.IMatrix.CHUNK_SIZE

# --- tensor-name suffixes ------------------------------------------------------
SUFFIX_IN_SUM2 = ".in_sum2"
SUFFIX_COUNTS = ".counts"
#: ours: plain sums of activations, needed by the L2-norm / cosine statistics.
SUFFIX_IN_SUM = ".in_sum"

# --- evaluation ----------------------------------------------------------------
#: ``eval_set`` of an evaluation on a single text (``evaluate.text``, ``imatrix evaluate``)
DEFAULT_EVAL_SET = "default"

# --- our provenance keys (llama.cpp ignores them) -----------------------------
PROVENANCE_PREFIX = "imatrix_pipeline."
KEY_VERSION = PROVENANCE_PREFIX + "version"
KEY_MODEL_SHA256 = PROVENANCE_PREFIX + "model_sha256"
KEY_DATASET_SHA256 = PROVENANCE_PREFIX + "dataset_sha256"
KEY_TOKENIZER = PROVENANCE_PREFIX + "tokenizer"
KEY_CHUNK_REACHED = PROVENANCE_PREFIX + "chunk_reached"
#: a collection's convergence record and stop (JSON; imatrix.convergence)
KEY_CONVERGENCE = PROVENANCE_PREFIX + "convergence"
#: per dataset, JSON of how its chunks were chosen (imatrix.sampling); "" for the
#: plain stream. Written only when some dataset was sampled or cut at documents.
KEY_DATASET_SELECTION = PROVENANCE_PREFIX + "dataset_selection"

# --- keys llama-quantize adds to a quantized model (tools/quantize/quantize.cpp;
# gguf-py does not have them) ----------------------------------------------------
KEY_QUANTIZE_IMATRIX_FILE = "quantize.imatrix.file"
KEY_QUANTIZE_IMATRIX_DATASET = "quantize.imatrix.dataset"
KEY_QUANTIZE_IMATRIX_N_ENTRIES = "quantize.imatrix.entries_count"
KEY_QUANTIZE_IMATRIX_N_CHUNKS = "quantize.imatrix.chunks_count"
#: the four, in the order llama-quantize writes them
KEYS_QUANTIZE_IMATRIX = (
    KEY_QUANTIZE_IMATRIX_FILE,
    KEY_QUANTIZE_IMATRIX_DATASET,
    KEY_QUANTIZE_IMATRIX_N_ENTRIES,
    KEY_QUANTIZE_IMATRIX_N_CHUNKS,
)

# --- split models (llama.cpp's llama_split_path; gguf-py's SHARD_NAME_FORMAT) ----
_SPLIT_NAME_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_name(prefix: str, no: int, count: int) -> str:
    """``PREFIX-0000N-of-0000M.gguf``, the name of split ``no`` (1-based) of ``count``."""
    return SHARD_NAME_FORMAT.format(prefix, no, count)


def parse_split_name(name: str) -> tuple[str, int, int] | None:
    """``(prefix, no, count)`` of a split file name, or None for any other name."""
    m = _SPLIT_NAME_RE.match(name)
    if m is None:
        return None
    return m.group("prefix"), int(m.group("no")), int(m.group("count"))


def split_glob(prefix: str) -> str:
    """A glob pattern matching every split file name of ``prefix`` (escaped)."""
    return glob.escape(prefix) + "-*-of-*.gguf"


def split_paths(path: Path) -> list[Path]:
    """Every split of the model whose split file (any of them) is ``path``, in order;
    ``[path]`` for a file that is not named as a split of more than one."""
    parsed = parse_split_name(path.name)
    if parsed is None or parsed[2] <= 1:
        return [path]
    prefix, _, count = parsed
    return [path.with_name(split_name(prefix, i, count)) for i in range(1, count + 1)]


# --- defaults of llama-imatrix -------------------------------------------------
DEFAULT_CHUNK_SIZE = 512
DEFAULT_OUTPUT = "imatrix.gguf"
