"""``python -m imatrix`` runs the CLI."""

from __future__ import annotations

import sys

from imatrix.cli import main

sys.exit(main())
