"""imatrix-pipeline: exact, resumable importance matrices for GGUF models.

The package is a library first: every CLI subcommand and every Snakemake rule is a
thin wrapper around one function here, so that what the workflow does can be
tested, reused and reasoned about without Snakemake.
"""

from __future__ import annotations

__version__ = "0.1.0"

from imatrix.errors import ImatrixError
from imatrix.model import Entry, ImatrixData

__all__ = ["Entry", "ImatrixData", "ImatrixError", "__version__"]
