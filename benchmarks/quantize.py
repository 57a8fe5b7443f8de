#!/usr/bin/env python
"""Benchmark: ``imatrix quantize`` against llama.cpp's ``llama-quantize``, side by side.

Both quantize the same base with the same imatrix to the same types; runs alternate
(ours, theirs, ours, ...) so that a busy machine affects both alike, and the fastest
of ``--repeat`` runs of each is kept. Every pair of outputs is also compared byte for
byte. Whole-process wall times (start-up, imatrix loading, quantization, write) are
compared; the target is ours within 5 % of llama-quantize.

Default model: the demo gemma-3-270m (PyPI chunk packages) turned into an F16 base by
our quantize (``--allow-requantize``, as the workflow does), cached under
~/.cache/imatrix-pipeline/bench; the imatrix comes from llama-imatrix on the
repository's calibration prose (4 chunks of 512).

    python benchmarks/quantize.py [--model F16.gguf] [--imatrix IM.gguf]
                                  [--types Q4_K_M,Q6_K,IQ4_XS] [--repeat 3] [-t 2]
"""

from __future__ import annotations

import argparse
import filecmp
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imatrix-pipeline" / "bench"
)

log = logging.getLogger("bench")


def llama_bin(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-llama-tools.sh")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def demo_f16() -> Path:
    """The demo model as an F16 base (made once, by our quantize, and cached)."""
    from imatrix.demo import DEMO_MODEL_NAME, assemble_demo_model
    from imatrix.quantize import quantize

    CACHE.mkdir(parents=True, exist_ok=True)
    f16 = CACHE / "gemma-3-270m-f16.gguf"
    if not f16.is_file():
        q = assemble_demo_model(CACHE / DEMO_MODEL_NAME)
        quantize(q, f16, "F16", allow_requantize=True)
    return f16


def demo_imatrix(bin_dir: Path, model: Path) -> Path:
    im = CACHE / f"{model.stem}-imatrix.gguf"
    if not im.is_file():
        text = ROOT / "data" / "calibration" / "prose.txt"
        cmd = [str(bin_dir / "llama-imatrix"), "-m", str(model), "-f", str(text), "-o", str(im)]
        cmd += ["-c", "512", "--chunks", "4", "--no-ppl"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return im


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="base model (default: the demo model as F16)")
    ap.add_argument("--imatrix", help="imatrix (default: llama-imatrix on the calibration prose)")
    ap.add_argument("--types", default="Q4_K_M,Q6_K,IQ4_XS,Q2_K", help="comma-separated types")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each tool per type (best kept)")
    ap.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all)")
    ap.add_argument("--llama-bin", help="directory of llama-quantize (default: build script)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    bin_dir = llama_bin(args.llama_bin)
    model = Path(args.model) if args.model else demo_f16()
    im = Path(args.imatrix) if args.imatrix else demo_imatrix(bin_dir, model)
    imatrix_cli = [sys.executable, "-m", "imatrix", "quantize", "-q"]
    threads = [str(args.threads)] if args.threads else []
    print(f"model {model} ({model.stat().st_size / 2**20:.0f} MiB), imatrix {im}")
    print(f"{'type':8} {'llama-quantize s':>17} {'imatrix s':>10} {'ratio':>7}  identical")
    worst = 0.0
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        for qtype in args.types.split(","):
            ref, ours = Path(tmp) / f"ref-{qtype}.gguf", Path(tmp) / f"ours-{qtype}.gguf"
            theirs_t, ours_t = [], []
            for _ in range(args.repeat):
                ours_t.append(
                    timed(
                        [*imatrix_cli, "--imatrix", str(im), str(model), str(ours), qtype, *threads]
                    )
                )
                theirs_t.append(
                    timed(
                        [
                            str(bin_dir / "llama-quantize"),
                            "--imatrix",
                            str(im),
                            str(model),
                            str(ref),
                            qtype,
                            *threads,
                        ]
                    )
                )
            same = filecmp.cmp(ref, ours, shallow=False)
            ratio = min(ours_t) / min(theirs_t)
            worst = max(worst, ratio)
            print(f"{qtype:8} {min(theirs_t):17.2f} {min(ours_t):10.2f} {ratio:7.3f}  {same}")
    print(f"worst ratio ours/llama-quantize: {worst:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
