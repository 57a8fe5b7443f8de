"""GGUF keys, tensor-name suffixes and format constants, in one place (gguf-py style).

Keeping them here means readers, writers and tests can never disagree on a key's
spelling, and a llama.cpp rename is a one-line change.
"""

from __future__ import annotations

# --- GGUF container -----------------------------------------------------------
GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
GGUF_DEFAULT_ALIGNMENT = 32

# --- keys llama-imatrix writes (common/imatrix-loader.h) -----------------------
KEY_GENERAL_TYPE = "general.type"
KEY_GENERAL_ARCHITECTURE = "general.architecture"
KEY_GENERAL_ALIGNMENT = "general.alignment"
GENERAL_TYPE_IMATRIX = "imatrix"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"

# --- tensor-name suffixes ------------------------------------------------------
SUFFIX_IN_SUM2 = ".in_sum2"
SUFFIX_COUNTS = ".counts"
#: ours: plain sums of activations, needed by the L2-norm / cosine statistics.
SUFFIX_IN_SUM = ".in_sum"

# --- our provenance keys (llama.cpp ignores them) -----------------------------
PROVENANCE_PREFIX = "imatrix_pipeline."
KEY_VERSION = PROVENANCE_PREFIX + "version"
KEY_MODEL_SHA256 = PROVENANCE_PREFIX + "model_sha256"
KEY_DATASET_SHA256 = PROVENANCE_PREFIX + "dataset_sha256"
KEY_TOKENIZER = PROVENANCE_PREFIX + "tokenizer"
KEY_CHUNK_REACHED = PROVENANCE_PREFIX + "chunk_reached"

# --- keys llama-quantize adds to a quantized model (tools/quantize) -----------
KEY_QUANTIZE_IMATRIX_FILE = "quantize.imatrix.file"
KEY_QUANTIZE_IMATRIX_DATASET = "quantize.imatrix.dataset"
KEY_QUANTIZE_IMATRIX_N_ENTRIES = "quantize.imatrix.entries_count"
KEY_QUANTIZE_IMATRIX_N_CHUNKS = "quantize.imatrix.chunks_count"

# --- defaults of llama-imatrix -------------------------------------------------
DEFAULT_CHUNK_SIZE = 512
DEFAULT_OUTPUT = "imatrix.gguf"
