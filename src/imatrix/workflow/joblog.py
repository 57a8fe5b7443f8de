"""A workflow job's output, all of it, into its Snakemake log file."""

from __future__ import annotations

import logging
import os
import sys

#: Format of a job log's lines.
LOG_FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"


def job_logging(path: str | os.PathLike[str], level: int = logging.INFO) -> None:
    """Send everything a job prints to its Snakemake log file.

    Python logging, warnings and tracebacks, and also llama.cpp's own messages, which
    its C code writes to file descriptors 1 and 2: both are pointed at the log, so a
    failed job's log holds the whole story.
    """
    fh = open(path, "w", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as the job
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fh.fileno(), 1)
    os.dup2(fh.fileno(), 2)
    sys.stdout = sys.stderr = fh
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(fh)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
