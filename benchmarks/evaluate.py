#!/usr/bin/env python
"""Benchmark: ``imatrix evaluate`` against ``llama-perplexity --kl-divergence``, side by side.

llama-perplexity needs two runs: the base model writes its log-probabilities of every
scored token to a file (``--kl-divergence-base``), then each quantized model reads it
(``--kl-divergence``). ``imatrix evaluate`` runs base and quants side by side, chunk
by chunk, and writes nothing but its summary. For the same model, text, chunks and
threads this prints wall time, peak resident memory (and memory beyond the weights
the process mapped: the model files' sizes), disk used for base logits, and the
figures both report (PPL, KLD mean/median/p99/max, same top p, mean Δp) with their
relative differences, then the ratios the evaluation issue sets as targets:
memory and disk at most a quarter of llama-perplexity's, faster than it.

Default model: the demo gemma-3-270m as an F16 base (cached under
~/.cache/imatrix-pipeline/bench, made by our quantize) and a Q4_K_M of it quantized
with an imatrix from llama-imatrix; default text: the repository's calibration prose
and technical texts (about 10k tokens), 8 chunks of 512.

    python benchmarks/evaluate.py [--base F16.gguf] [--quant Q.gguf] [--text T.txt]
                                  [--chunks 8] [-c 512] [-t 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantize import CACHE, demo_f16, demo_imatrix  # noqa: E402

from imatrix.reference import pinned_tools_dir  # noqa: E402

log = logging.getLogger("bench")


#: seconds the exit shim (see :func:`flush_env`) keeps llama-perplexity alive at exit;
#: subtracted from its measured wall time
EXIT_DELAY = 0.2


def flush_env() -> tuple[dict[str, str], float]:
    """An environment in which llama-perplexity's final statistics are not lost.

    llama.cpp's tools log through an asynchronous logger that is never flushed at
    exit (upstream issue 22142); on a busy machine the last lines, the final
    statistics, go missing. A preloaded library whose destructor sleeps briefly at
    exit lets the logger thread finish. Returns the environment and the delay added.
    """
    import shutil

    env = dict(os.environ)
    cc = shutil.which("cc") or shutil.which("gcc")
    lib = CACHE / "libexitdelay.so"
    if cc and not lib.is_file():
        src = CACHE / "exitdelay.c"
        usec = int(EXIT_DELAY * 1e6)
        src.write_text(
            "#include <unistd.h>\n"
            f"__attribute__((destructor)) static void wait_for_log(void) {{ usleep({usec}); }}\n"
        )
        subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=False)
    if lib.is_file():
        env["LD_PRELOAD"] = str(lib)
        return env, EXIT_DELAY
    return env, 0.0


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Wall seconds, peak RSS in bytes (of this child alone, from wait4) and its output."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        dt = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{text[-3000:]}")
    return dt, usage.ru_maxrss * 1024, text


def _num(text: str, label: str) -> float:
    m = re.search(re.escape(label) + r"\s*:\s*(-?[\d.]+)", text)
    if not m:
        sys.exit(f"'{label}' not found in llama-perplexity's output")
    return float(m.group(1))


def default_text() -> Path:
    path = CACHE / "eval-text.txt"
    if not path.is_file():
        cal = ROOT / "data" / "calibration"
        parts = [(cal / "prose.txt").read_text(encoding="utf-8")]
        for line in (cal / "technical.jsonl").read_text(encoding="utf-8").splitlines():
            if line.strip():
                parts.append(json.loads(line)["text"])
        path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return path


def default_quant(bin_dir: Path, base: Path) -> Path:
    from imatrix.quantize import quantize

    q = CACHE / f"{base.stem}-Q4_K_M-imatrix.gguf"
    if not q.is_file():
        quantize(base, q, "Q4_K_M", imatrix=str(demo_imatrix(bin_dir, base)))
    return q


def mib(n: float) -> str:
    return f"{n / 2**20:8.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", help="base model (default: the demo model as F16)")
    ap.add_argument("--quant", help="quantized model (default: Q4_K_M of the base with an imatrix)")
    ap.add_argument("--text", help="evaluation text")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("-c", "--ctx-size", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--rows", type=int, default=None, help="imatrix evaluate --rows")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each (fastest kept)")
    ap.add_argument(
        "--llama-bin",
        help="directory of llama-perplexity (default: $IMATRIX_LLAMA_BIN, else the build script)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    bin_dir = pinned_tools_dir(args.llama_bin)
    base = Path(args.base) if args.base else demo_f16()
    quant = Path(args.quant) if args.quant else default_quant(bin_dir, base)
    text = Path(args.text) if args.text else default_text()
    thr = ["-t", str(args.threads)] if args.threads else []
    common = ["-c", str(args.ctx_size), "--chunks", str(args.chunks), *thr]
    w_base, w_quant = base.stat().st_size, quant.stat().st_size
    print(f"base {base.name} ({mib(w_base).strip()}), quant {quant.name} ({mib(w_quant).strip()})")
    print(f"text {text}, {args.chunks} chunks of {args.ctx_size}")

    env, delay = flush_env()
    ppl = str(bin_dir / "llama-perplexity")
    t1 = t2 = t3 = float("inf")
    rss1 = rss2 = rss3 = 0
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        kld = Path(tmp) / "base.kld"
        summary = Path(tmp) / "summary.parquet"
        ours_cmd = [sys.executable, "-m", "imatrix", "evaluate", "-q", str(base), str(quant)]
        ours_cmd += ["-f", str(text), *common, "-o", str(summary)]
        if args.rows:
            ours_cmd += ["--rows", str(args.rows)]
        # alternate the tools so that a busy machine slows both alike; keep the fastest
        for _ in range(args.repeat):
            a, r1, _ = run_measured(
                [ppl, "-m", str(base), "-f", str(text), *common, "--kl-divergence-base", str(kld)],
                env,
            )
            disk = kld.stat().st_size
            b, r2, out = run_measured(
                [ppl, "-m", str(quant), *thr, "--kl-divergence-base", str(kld), "--kl-divergence"],
                env,
            )
            kld.unlink()
            c, r3, _ = run_measured(ours_cmd)
            t1, t2, t3 = min(t1, a - delay), min(t2, b - delay), min(t3, c)
            rss1, rss2, rss3 = max(rss1, r1), max(rss2, r2), max(rss3, r3)
        import pandas as pd

        table = pd.read_parquet(summary)
        ours, ours_base = table.iloc[1], table.iloc[0]

    theirs = {
        "ppl": _num(out, "Mean PPL(Q)"),
        "ppl(base)": _num(out, "Mean PPL(base)"),
        "kld_mean": _num(out, "Mean    KLD"),
        "kld_median": _num(out, "Median  KLD"),
        "kld_p99": _num(out, "99.0%   KLD"),
        "kld_max": _num(out, "Maximum KLD"),
        "same_top_p": _num(out, "Same top p") / 100,
        "mean_dp": _num(out, "Mean    Δp") / 100,
    }
    mine = {k: float(ours[k]) for k in theirs if k != "ppl(base)"}
    mine["ppl(base)"] = float(ours_base["ppl"])

    print()
    print(f"{'':28}{'llama-perplexity':>20}{'imatrix evaluate':>20}{'ratio':>9}")
    rows = [
        ("wall time, base pass", f"{t1:16.1f} s", "", ""),
        ("wall time, KLD pass", f"{t2:16.1f} s", "", ""),
        ("wall time, total", f"{t1 + t2:16.1f} s", f"{t3:16.1f} s", f"{t3 / (t1 + t2):9.3f}"),
        (
            "peak RSS",
            f"{mib(max(rss1, rss2)):>20}",
            f"{mib(rss3):>20}",
            f"{rss3 / max(rss1, rss2):9.3f}",
        ),
    ]
    beyond_theirs = max(rss1 - w_base, rss2 - w_quant)
    beyond_ours = rss3 - w_base - w_quant
    rows.append(
        (
            "RSS beyond model weights",
            f"{mib(beyond_theirs):>20}",
            f"{mib(beyond_ours):>20}",
            f"{beyond_ours / beyond_theirs:9.3f}",
        )
    )
    rows.append(("disk for base logits", f"{mib(disk):>20}", f"{mib(0):>20}", f"{0:9.3f}"))
    for name, a, b, r in rows:
        print(f"{name:28}{a:>20}{b:>20}{r:>9}")
    print()
    print(f"{'figure':28}{'llama-perplexity':>20}{'imatrix evaluate':>20}{'rel diff':>9}")
    for k, v in theirs.items():
        m = mine[k]
        rel = (m - v) / abs(v) if v else float("nan")
        print(f"{k:28}{v:20.6f}{m:20.6f}{rel:9.4f}")
    print()
    print(f"time ratio ours/llama-perplexity: {t3 / (t1 + t2):.3f} (target < 1)")
    print(f"memory beyond weights ratio: {beyond_ours / beyond_theirs:.3f} (target <= 0.25)")
    print(f"disk ratio: {0 / disk:.3f} (target <= 0.25)")


if __name__ == "__main__":
    main()
