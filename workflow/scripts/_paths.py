"""Put this checkout's library first on ``sys.path`` (imported first by every script).

Why: under ``--software-deployment-method conda`` a job runs in an environment that has
the library's dependencies (workflow/envs/*.yaml) but not the package itself; and outside conda
the workflow must still run the library of its own checkout, not another installed
version.
"""

from __future__ import annotations

import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")
# First, even when already listed: Snakemake's preamble appends the workflow's paths after
# those of the interpreter, where an editable install of another checkout may come first.
if Path(SRC).is_dir():
    while SRC in sys.path:
        sys.path.remove(SRC)
    sys.path.insert(0, SRC)
