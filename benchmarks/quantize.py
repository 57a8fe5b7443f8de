#!/usr/bin/env python
"""Benchmark: ``imatrix quantize`` against llama.cpp's ``llama-quantize``, side by side.

Both quantize the same base with the same imatrix to the same types; runs alternate
(ours, theirs, ours, ...) so that a busy machine affects both alike, and the fastest
of ``--repeat`` runs of each is kept. Every pair of outputs is also compared byte for
byte. llama-quantize's whole process is compared with ours two ways: our whole process
(Python start-up and imports included, about 0.3 s) and our ``quantize()`` call (imatrix
loading, quantization, atomic write); the target, within 5 %, is for the call: on a
model of a few hundred MB the start-up alone is 5-10 % of the time, on real models
noise. CPU times (all threads) are shown too: on a machine other jobs share, wall
times of a few seconds vary by tens of percent, CPU times far less.

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

from imatrix.reference import pinned_tools_dir

ROOT = Path(__file__).resolve().parents[1]
CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imatrix-pipeline" / "bench"
)

log = logging.getLogger("bench")


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


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system, all threads, from wait4) and stdout."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        dt = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"failed: {' '.join(cmd)}\n{err.read()[-2000:]}")
        return dt, usage.ru_utime + usage.ru_stime, out.read()


#: our side in a fresh process: the quantize() call is timed inside it, after the
#: imports (Python, numpy, llama-cpp-python), so both the whole process and the call
#: can be compared with llama-quantize's process
_OURS = """
import resource, sys, time
from imatrix.quantize import quantize
import llama_cpp  # noqa: F401  (loading the shared library is part of start-up)
base, out, qtype, im, threads = sys.argv[1:6]
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
t0, c0 = time.perf_counter(), cpu()
quantize(base, out, qtype, imatrix=im, threads=int(threads) or None)
print(time.perf_counter() - t0, cpu() - c0)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="base model (default: the demo model as F16)")
    ap.add_argument("--imatrix", help="imatrix (default: llama-imatrix on the calibration prose)")
    ap.add_argument("--types", default="Q4_K_M,Q6_K,IQ4_XS,Q2_K", help="comma-separated types")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each tool per type (best kept)")
    ap.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all)")
    ap.add_argument(
        "--llama-bin",
        help="directory of llama-quantize (default: $IMATRIX_LLAMA_BIN, else the build script)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    bin_dir = pinned_tools_dir(args.llama_bin)
    model = Path(args.model) if args.model else demo_f16()
    im = Path(args.imatrix) if args.imatrix else demo_imatrix(bin_dir, model)
    threads = [str(args.threads)] if args.threads else []
    print(f"model {model} ({model.stat().st_size / 2**20:.0f} MiB), imatrix {im}")
    print("fastest of each in seconds; 'call': our quantize() inside the process, after the")
    print("imports; 'cpu': user + system time of all threads (robust when the machine is busy)")
    print(
        f"{'type':8} {'llama-quantize':>15} {'ours call':>10} {'ours process':>13}"
        f" {'cpu llama':>10} {'cpu call':>9} {'ratio call':>11} {'ratio cpu':>10}  identical"
    )
    worst = {"call": 0.0, "cpu": 0.0, "process": 0.0}
    CACHE.mkdir(parents=True, exist_ok=True)  # the scratch files live beside the cache
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        for qtype in args.types.split(","):
            ref, ours = Path(tmp) / f"ref-{qtype}.gguf", Path(tmp) / f"ours-{qtype}.gguf"
            t = {k: [] for k in ("llama", "llama_cpu", "proc", "call", "call_cpu")}
            for _ in range(args.repeat):  # alternate, so that load affects both alike
                ours_cmd = [sys.executable, "-c", _OURS, str(model), str(ours), qtype, str(im)]
                dt, _, out = timed([*ours_cmd, str(args.threads or 0)])
                call, call_cpu = map(float, out.split()[-2:])
                t["proc"].append(dt)
                t["call"].append(call)
                t["call_cpu"].append(call_cpu)
                theirs_cmd = [str(bin_dir / "llama-quantize"), "--imatrix", str(im), str(model)]
                dt, cpu, _ = timed([*theirs_cmd, str(ref), qtype, *threads])
                t["llama"].append(dt)
                t["llama_cpu"].append(cpu)
            same = filecmp.cmp(ref, ours, shallow=False)
            m = {k: min(v) for k, v in t.items()}
            ratios = {
                "call": m["call"] / m["llama"],
                "cpu": m["call_cpu"] / m["llama_cpu"],
                "process": m["proc"] / m["llama"],
            }
            worst = {k: max(worst[k], v) for k, v in ratios.items()}
            print(
                f"{qtype:8} {m['llama']:15.2f} {m['call']:10.2f} {m['proc']:13.2f}"
                f" {m['llama_cpu']:10.2f} {m['call_cpu']:9.2f} {ratios['call']:11.3f}"
                f" {ratios['cpu']:10.3f}  {same}"
            )
    print(f"worst ratio, quantize() call / llama-quantize (wall): {worst['call']:.3f}")
    print(f"worst ratio, quantize() call / llama-quantize (cpu):  {worst['cpu']:.3f}")
    print(f"worst ratio, our whole process / llama-quantize (wall): {worst['process']:.3f}")
    print("target: within 5 % (ratio <= 1.05)")


if __name__ == "__main__":
    main()
