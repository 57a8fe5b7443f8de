#!/usr/bin/env python
"""Benchmark: ``imatrix collect`` with and without activation sums on the GPU.

Runs the collection three times in this process, without perplexity: with the sums
on the device (``IMATRIX_DEVICE_SUMS=on``), with every activation copied to the host
(``off``), and on the device again. Prints tokens/s of the chunk loop for each, the
parity of each result with a reference imatrix (llama-imatrix's, same model, text and
chunks: same tensor names and counts, largest relative difference of ``in_sum2``
against the 1e-4 limit), and whether the two device runs gave identical sums (they
must: the device arithmetic has a fixed order). When the device path is unavailable
the ``on`` runs are reported as such and the host run still is. The first run carries
the one-time costs (files into the page cache, CuPy compiling its kernels on a first use
on the machine): compare the last two.

    python benchmarks/device_sums.py --model M.gguf --text T.txt --reference REF.gguf \\
        [--chunks 16] [-c 512] [-ngl 99] [-t THREADS]

Needs a CUDA build of llama-cpp-python and CuPy (the ``cuda`` extra); see
benchmarks/gpu_check.sh, which runs it.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imatrix.collect.device import ENV
from imatrix.errors import ImatrixError
from imatrix.model import ImatrixData

#: llama-imatrix's float32 sums against ours: the parity limit per element
PARITY_LIMIT = 1e-4
log = logging.getLogger("bench")


@dataclass
class Run:
    mode: str
    tokens_per_s: float = float("nan")
    parity: str = ""
    digest: str = ""
    error: str = ""
    #: the collector's log lines about where activations were summed
    where: list[str] = field(default_factory=list)


class _Where(logging.Handler):
    """Keeps the collector's lines saying where activations are summed."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        if "activations" in (msg := record.getMessage()):
            self.lines.append(msg)


def parity(ours: ImatrixData, ref: ImatrixData) -> str:
    """One line: same tensor names and counts as ``ref``, and the largest relative
    difference of the values against :data:`PARITY_LIMIT` (gpu_check.sh prints it too)."""
    names = sorted(ref.entries)
    same_names = sorted(ours.entries) == names
    worst, counts_ok = 0.0, True
    for n in names:
        a, b = ours.entries.get(n), ref.entries[n]
        if a is None or a.values.shape != b.values.shape:
            same_names = False
            continue
        counts_ok &= bool(np.array_equal(a.counts, b.counts))
        den = np.maximum(np.abs(b.values), 1e-30)
        worst = max(worst, float(np.max(np.abs(a.values - b.values) / den)))
    ok = same_names and counts_ok and worst <= PARITY_LIMIT
    limit = np.format_float_scientific(PARITY_LIMIT, trim="-", exp_digits=1)
    return (
        f"{len(names)} tensors, same names {same_names}, same counts {counts_ok}, "
        f"max relative error {worst:.2e} -> {'PASS' if ok else 'FAIL'} (limit {limit})"
    )


def digest(data: ImatrixData) -> str:
    h = hashlib.sha256()
    for n, e in sorted(data.entries.items()):
        h.update(n.encode())
        for a in (e.values, e.counts, e.sums):
            if a is not None:
                h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def run(mode: str, model: Path, tokens: np.ndarray, args: argparse.Namespace) -> Run:
    from imatrix.collect import CollectSettings, collect
    from imatrix.formats import read_imatrix

    settings = CollectSettings(
        last_chunk=args.chunks,
        n_ctx=args.ctx_size,
        threads=args.threads,
        n_gpu_layers=args.ngl,
        compute_ppl=False,
        progress=False,
    )
    os.environ[ENV] = mode  # read when the collector is made
    r = Run(mode)
    logger = logging.getLogger("imatrix.collect")
    handler = _Where(r.where)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        res = collect(model, tokens, None, settings, dataset="bench")
    except ImatrixError as exc:
        r.error = str(exc)
        return r
    finally:
        logger.removeHandler(handler)
    r.tokens_per_s = res.n_tokens / res.compute_seconds
    r.parity = parity(res.data, read_imatrix(args.reference))
    r.digest = digest(res.data)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--text", required=True, type=Path)
    ap.add_argument("--reference", required=True, type=Path, help="llama-imatrix's imatrix")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("-c", "--ctx-size", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("-ngl", type=int, default=99)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    for h in logging.getLogger().handlers:  # the collector's INFO lines go to _Where only
        h.setLevel(logging.WARNING)
    from imatrix.llama_api import load_model
    from imatrix.tokenize import read_text, tokenize_text

    with load_model(args.model, vocab_only=True) as m:
        tokens = tokenize_text(m, read_text(args.text))
    runs = [run(mode, args.model, tokens, args) for mode in ("on", "off", "on")]
    for r in runs:
        what = f"device sums {r.mode:3s}"
        if r.error:
            print(f"  {what}: unavailable: {r.error}")
        else:
            print(f"  {what}: {r.tokens_per_s:10.1f} tokens/s (chunk loop); parity: {r.parity}")
            print(f"      {'; '.join(r.where) or 'no activation lived on a device'}")
    a, b = runs[0], runs[2]
    if not a.error and not b.error:
        same = "identical" if a.digest == b.digest else "DIFFERENT (not deterministic)"
        print(f"  two device runs: sums {same}")


if __name__ == "__main__":
    main()
