#!/usr/bin/env python
"""Benchmark: ``imatrix quantize`` against llama.cpp's ``llama-quantize``, side by side.

Both quantize the same base with the same imatrix to the same types; runs alternate
(ours, theirs, ours, ...) so that a busy machine affects both alike, and the fastest
of ``--repeat`` runs of each is kept. Every pair of outputs is also compared byte for
byte. llama-quantize's whole process is compared with ours two ways: our whole process
(Python start-up and imports included, about 0.3 s) and our ``quantize()`` call (imatrix
loading, quantization, write); the target, within 5 %, is for the call: on a model of
a few hundred MB the start-up alone is 5-10 % of the time, on real models noise.

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


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return dt, r.stdout


#: our side in a fresh process: the quantize() call is timed inside it, after the
#: imports (Python, numpy, llama-cpp-python), so both the whole process and the call
#: can be compared with llama-quantize's process
_OURS = """
import sys, time
from imatrix.quantize import quantize
import llama_cpp  # noqa: F401  (loading the shared library is part of start-up)
base, out, qtype, im, threads = sys.argv[1:6]
t0 = time.perf_counter()
quantize(base, out, qtype, imatrix=im, threads=int(threads) or None)
print(time.perf_counter() - t0)
"""


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
    threads = [str(args.threads)] if args.threads else []
    print(f"model {model} ({model.stat().st_size / 2**20:.0f} MiB), imatrix {im}")
    print("seconds, fastest of each; 'call': quantize() inside the process, after imports")
    head = f"{'type':8} {'llama-quantize':>15} {'ours process':>13} {'ours call':>10}"
    print(f"{head} {'ratio process':>14} {'ratio call':>11}  identical")
    worst_call = worst_proc = 0.0
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        for qtype in args.types.split(","):
            ref, ours = Path(tmp) / f"ref-{qtype}.gguf", Path(tmp) / f"ours-{qtype}.gguf"
            theirs_t, proc_t, call_t = [], [], []
            for _ in range(args.repeat):  # alternate, so that load affects both alike
                dt, out = timed(
                    [
                        sys.executable,
                        "-c",
                        _OURS,
                        str(model),
                        str(ours),
                        qtype,
                        str(im),
                        str(args.threads or 0),
                    ]
                )
                proc_t.append(dt)
                call_t.append(float(out.strip().splitlines()[-1]))
                dt, _ = timed(
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
                theirs_t.append(dt)
            same = filecmp.cmp(ref, ours, shallow=False)
            t_ref = min(theirs_t)
            r_proc, r_call = min(proc_t) / t_ref, min(call_t) / t_ref
            worst_proc, worst_call = max(worst_proc, r_proc), max(worst_call, r_call)
            print(
                f"{qtype:8} {t_ref:15.2f} {min(proc_t):13.2f} {min(call_t):10.2f} "
                f"{r_proc:14.3f} {r_call:11.3f}  {same}"
            )
    print(f"worst ratio, quantize() call / llama-quantize: {worst_call:.3f} (target <= 1.05)")
    print(f"worst ratio, whole process / llama-quantize: {worst_proc:.3f} (start-up included)")


if __name__ == "__main__":
    main()
