"""An imatrix in another format: what ``imatrix convert`` and the workflow's convert step do."""

from __future__ import annotations

from pathlib import Path

from imatrix.formats import FORMAT_GGUF, read_imatrix, write_imatrix
from imatrix.model import ImatrixData, Provenance, combine


def convert_imatrix(
    src: str | Path,
    output: str | Path,
    *,
    output_format: str = FORMAT_GGUF,
    compat: bool = False,
    chunk_size: int | None = None,
) -> Path:
    """Write the imatrix ``src`` as ``output`` in ``output_format``.

    The values go through a one-input combine, which is exactly what
    ``llama-imatrix --in-file SRC -o OUT`` does (so the bytes equal llama.cpp's); the
    provenance is kept, minus the chunk a checkpoint had reached. ``chunk_size`` scales
    a legacy ``.dat`` input and sets the output's chunk size (default: from the input).
    """
    provenance: list[Provenance] = []

    def load() -> ImatrixData:  # keeps only the provenance, so the input is not held twice
        data = read_imatrix(src, chunk_size=chunk_size)
        provenance.append(data.provenance)
        return data

    out = combine([load], chunk_size=chunk_size, sources=[str(src)])
    out.provenance = provenance[0]
    out.provenance.chunk_reached = None
    write_imatrix(out, output, output_format=output_format, compat=compat)
    return Path(output)
