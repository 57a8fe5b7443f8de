"""Put this checkout's library first on ``sys.path`` (imported first by every script).

Why: under ``--software-deployment-method conda`` a job runs in an environment that has
the library's dependencies (workflow/envs/*.yaml) but not the package itself; and outside conda
the workflow must still run the library of its own checkout, not another installed
version.
"""

from __future__ import annotations

import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
if SRC.is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))
