#!/usr/bin/env python
"""Benchmark: the pipeline at real model and cluster scale, time and peak memory.

Three measurements, each a separate process timed from outside (wall seconds, peak
resident memory from the kernel's accounting of that child, started by a small runner
process so that the benchmark's own size does not leak into the figure):

- collect: ``imatrix collect`` against ``llama-imatrix`` on a ~1B dense (llama) and a
  ~1B-total MoE (qwen3moe) synthetic model (benchmarks/synthetic_model.py: random
  weights, so only speed and memory mean anything), N chunks of 512 tokens, no
  perplexity. Tokens/s counts the whole process (model load included) for both.
- merge: ``imatrix combine`` of S shards of a large MoE imatrix (default 48 layers x
  128 experts, hidden 4096, expert FFN 1536: the shape of a 200B-class MoE), written
  directly with the project's writers from random values (deterministic), then
  ``imatrix stats`` and ``imatrix check`` on the result. The target for the merge's
  peak memory is 3x one imatrix held in float64; a bare interpreter with the same imports
  is measured too, since at small shapes it is most of the peak.
- dry run: ``snakemake -n`` of a config with one dataset in 1,000 shards and 10
  quantization types (the workflow as it is in this checkout).

Prints a Markdown table with the machine it ran on (for benchmarks/README.md).

    python benchmarks/scale.py [--only collect,merge,dryrun] [--chunks 8] [--shards 64]
        [--merge-layers 48] [--merge-experts 128] [--merge-hidden 4096] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from imatrix.model import ImatrixData

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
CTX = 512
RUN_TIMEOUT = 3600
QUANT_TYPES = [
    "Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "IQ3_XXS", "IQ4_XS",
]  # fmt: skip
DRY_SHARDS = 1000
SHARD_TOKENS = 64 * CTX  # tokens behind each generated shard
EXPERTS_USED = 8
#: What every ``python -m imatrix`` child loads before it reads a file (its fixed memory).
BASELINE = "import sys, imatrix.cli, imatrix.formats; open(sys.argv[1], 'w').write('ok')"

log = logging.getLogger("scale")


@dataclass
class Row:
    what: str
    size: str
    seconds: float
    rss_mb: float
    note: str = ""


#: Runs a command and writes "exit-code peak-RSS-KiB wall-seconds" to argv[1]. Why a
#: runner: Linux keeps a process's peak RSS across exec, so a child forked straight from
#: this (by then large) benchmark process would report at least our own size.
RUNNER = """import resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.run(sys.argv[3:], timeout=float(sys.argv[2])).returncode
dt = time.perf_counter() - t0
kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
open(sys.argv[1], "w").write(f"{rc} {kib} {dt}")
"""


def measure(cmd: Sequence[str | Path], *, cwd: Path | None = None) -> tuple[float, float, str]:
    """Run ``cmd``; its wall seconds, peak RSS in MB (this child only) and output tail."""
    log.info("running %s", " ".join(map(str, cmd))[:300])
    with tempfile.TemporaryFile() as out, tempfile.TemporaryDirectory() as td:
        result = Path(td) / "result"
        runner = [sys.executable, "-c", RUNNER, str(result), str(RUN_TIMEOUT)]
        p = subprocess.run(
            [*runner, *map(str, cmd)],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=RUN_TIMEOUT + 60,
            check=False,
        )
        out.seek(0)
        tail = out.read().decode(errors="replace")[-3000:]
        fields = result.read_text().split() if result.is_file() else []
    if p.returncode != 0 or not fields or fields[0] != "0":
        raise SystemExit(f"{cmd[0]} failed:\n{tail}")
    rss = int(fields[1]) / 1024  # ru_maxrss is in KiB on Linux
    dt = float(fields[2])
    log.info("... done in %.1f s, peak RSS %.0f MB", dt, rss)
    return dt, rss, tail


# ---------------------------------------------------------------- collect


def synth_model(path: Path, arch: str) -> Row:
    if not path.is_file():
        dt, rss, _ = measure(
            [
                sys.executable,
                BENCH / "synthetic_model.py",
                "--arch",
                arch,
                "--params",
                "1B",
                "-o",
                path,
            ]
        )
        mb = path.stat().st_size / 1e6
        return Row(f"write synthetic {arch} 1B", f"{mb:.0f} MB", dt, rss, f"{mb / dt:.0f} MB/s")
    return Row(f"write synthetic {arch} 1B", "(reused)", float("nan"), float("nan"))


def calibration_text(work: Path, chunks: int) -> Path:
    """The repository's prose repeated: far more than ``chunks`` chunks of tokens."""
    prose = (ROOT / "data" / "calibration" / "prose.txt").read_text(encoding="utf-8")
    out = work / "calibration.txt"
    out.write_text("\n\n".join([prose] * max(4, chunks)), encoding="utf-8")
    return out


def collect_rows(args: argparse.Namespace, work: Path) -> list[Row]:
    text = calibration_text(work, args.chunks)
    bins = Path(args.llama_bin or os.environ.get("IMATRIX_LLAMA_BIN", ""))
    if not (bins / "llama-imatrix").is_file():
        raise SystemExit("set IMATRIX_LLAMA_BIN or --llama-bin to the llama.cpp tools")
    rows: list[Row] = []
    tokens = args.chunks * CTX
    for arch, label in (("llama", "dense"), ("qwen3moe", "MoE")):
        model = work / f"synthetic-{arch}-1B.gguf"
        rows.append(synth_model(model, arch))
        common = ["-m", model, "-f", text, "-c", CTX, "--chunks", args.chunks, "-t", args.threads]
        common += ["--no-ppl"]
        ours = [sys.executable, "-m", "imatrix", "collect"]
        runs = {
            "llama-imatrix": [bins / "llama-imatrix", *common, "-o", work / f"ref-{arch}.gguf"],
            "imatrix collect": [*ours, *common, "-o", work / f"ours-{arch}.gguf"],
        }
        for name, cmd in runs.items():
            dt, rss, _ = measure(cmd)
            size = f"{label} 1B, {args.chunks}x{CTX} tokens"
            rows.append(Row(name, size, dt, rss, f"{tokens / dt:.1f} tokens/s (whole run)"))
    return rows


# ---------------------------------------------------------------- merge


def moe_layout(layers: int, experts: int, hidden: int, ff: int) -> list[tuple[str, int, int]]:
    """(tensor, counts, row) of every matrix llama-imatrix records in a MoE model."""
    out: list[tuple[str, int, int]] = []
    for i in range(layers):
        p = f"blk.{i}."
        out += [(p + t, 1, hidden) for t in ("attn_q", "attn_k", "attn_v", "attn_output")]
        out += [(p + "ffn_gate_inp", 1, hidden)]
        out += [(p + "ffn_gate_exps", experts, hidden), (p + "ffn_up_exps", experts, hidden)]
        out += [(p + "ffn_down_exps", experts, ff)]
    return sorted((n + ".weight", c, r) for n, c, r in out)


def make_shard(layout: list[tuple[str, int, int]], seed: int) -> ImatrixData:
    """One shard's imatrix: counts as a router spreads tokens, positive sums of squares
    that grow with the counts, signed plain sums; provenance as collect writes it."""
    from imatrix.model import Entry, ImatrixData, Provenance

    rng = np.random.default_rng(seed)
    entries = {}
    for name, n, row in layout:
        if n == 1:
            counts = np.array([float(SHARD_TOKENS)])
        else:
            counts = rng.multinomial(SHARD_TOKENS * EXPERTS_USED, np.full(n, 1.0 / n)).astype(float)
        per = np.repeat(counts, row)
        values = rng.random(n * row) * per + per
        sums = rng.standard_normal(n * row) * np.sqrt(per)
        entries[name] = Entry(values, counts, sums)
    return ImatrixData(
        entries=entries,
        datasets=["bench"],
        chunk_count=SHARD_TOKENS // CTX,
        chunk_size=CTX,
        provenance=Provenance(model_sha256="0" * 64, dataset_sha256=["1" * 64], tokenizer="{}"),
    )


def float64_bytes(layout: list[tuple[str, int, int]]) -> int:
    """One imatrix in memory as ImatrixData holds it: values and sums float64, counts."""
    return sum(8 * (2 * c * r + c) for _, c, r in layout)


def merge_rows(args: argparse.Namespace, work: Path) -> list[Row]:
    from imatrix.formats import write_imatrix

    layout = moe_layout(args.merge_layers, args.merge_experts, args.merge_hidden, args.merge_ff)
    one = float64_bytes(layout) / 1e6
    size = (
        f"{args.shards} x ({args.merge_layers} layers x {args.merge_experts} experts, "
        f"hidden {args.merge_hidden})"
    )
    shards = [work / "shards" / f"{s}.gguf" for s in range(args.shards)]
    shards[0].parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for s, path in enumerate(shards):
        write_imatrix(make_shard(layout, seed=s), path)
    gen = time.perf_counter() - t0
    disk = sum(p.stat().st_size for p in shards) / 1e6
    rows = [Row("write shards (random)", size, gen, float("nan"), f"{disk:.0f} MB on disk")]
    merged = work / "merged.gguf"
    dt, rss, _ = measure([sys.executable, "-m", "imatrix", "combine", *shards, "-o", merged])
    note = f"{rss / one:.1f}x one imatrix in float64 ({one:.0f} MB; target <= 3x)"
    rows.append(Row("imatrix combine", size, dt, rss, note))
    base = work / "baseline.txt"
    dt, rss, _ = measure([sys.executable, "-c", BASELINE, base])
    note = f"{rss:.0f} MB of the combine's peak is the interpreter and imports"
    rows.append(Row("python -c 'import imatrix.cli'", "baseline", dt, rss, note))
    stats: list[str | Path] = [sys.executable, "-m", "imatrix", "stats", merged, "--no-table"]
    dt, rss, _ = measure([*stats, "--parquet", work / "stats"])
    rows.append(Row("imatrix stats --parquet", "merged", dt, rss))
    dt, rss, _ = measure([sys.executable, "-m", "imatrix", "check", merged])
    rows.append(Row("imatrix check", "merged", dt, rss))
    return rows


# ---------------------------------------------------------------- dry run


def snakefile() -> Path:
    for p in (ROOT / "workflow" / "Snakefile", ROOT / "Snakefile"):
        if p.is_file():
            return p
    raise SystemExit("no Snakefile in workflow/ or the repository root")


def dryrun_rows(work: Path) -> list[Row]:
    import yaml

    d = work / "dryrun"
    (d / "data").mkdir(parents=True, exist_ok=True)
    (d / "models").mkdir(exist_ok=True)
    measure(
        [
            sys.executable,
            BENCH / "synthetic_model.py",
            "--params",
            "tiny",
            "-o",
            d / "models/m.gguf",
        ]
    )
    (d / "data" / "text.txt").write_text("calibration text\n" * 100, encoding="utf-8")
    config = {
        "models": {"m": {"path": "models/m.gguf"}},
        "datasets": {"text": {"path": "data/text.txt"}},
        "collect": {"n_ctx": CTX, "shards": DRY_SHARDS},
        "quantize": {"types": QUANT_TYPES},
        "evaluate": {"text": "data/text.txt"},
    }
    (d / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    cmd: list[str | Path] = [sys.executable, "-m", "snakemake", "-s", snakefile(), "-n", "-c2"]
    dt, rss, out = measure([*cmd, "--configfile", "config.yaml"], cwd=d)
    jobs = next((ln.split()[-1] for ln in out.splitlines() if ln.startswith("total")), "?")
    size = f"{DRY_SHARDS} shards x {len(QUANT_TYPES)} types"
    return [Row("snakemake -n", size, dt, rss, f"{jobs} jobs")]


# ---------------------------------------------------------------- report


def machine() -> str:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    mem = next(
        int(ln.split()[1]) / 2**20
        for ln in Path("/proc/meminfo").read_text().splitlines()
        if ln.startswith("MemTotal")
    )
    return f"{os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB RAM, Python {platform.python_version()}"


def table(rows: list[Row]) -> str:
    out = ["| step | size | wall s | peak RSS MB | notes |", "|---|---|---:|---:|---|"]
    for r in rows:
        s = "" if np.isnan(r.seconds) else f"{r.seconds:.1f}"
        m = "" if np.isnan(r.rss_mb) else f"{r.rss_mb:.0f}"
        out.append(f"| {r.what} | {r.size} | {s} | {m} | {r.note} |")
    return "\n".join(out)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", default="collect,merge,dryrun", help="comma-separated parts")
    ap.add_argument("--chunks", type=int, default=8, help="collect: chunks of 512 tokens")
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--llama-bin", help="directory of llama-imatrix (default $IMATRIX_LLAMA_BIN)")
    ap.add_argument("--shards", type=int, default=64, help="merge: number of shards")
    ap.add_argument("--merge-layers", type=int, default=48)
    ap.add_argument("--merge-experts", type=int, default=128)
    ap.add_argument("--merge-hidden", type=int, default=4096)
    ap.add_argument("--merge-ff", type=int, default=1536, help="merge: expert FFN width")
    ap.add_argument("--workdir", help="keep models and files here (default: a temporary dir)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parts = {"collect": collect_rows, "merge": merge_rows}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as td:
        work = Path(args.workdir or td)
        work.mkdir(parents=True, exist_ok=True)
        rows: list[Row] = []
        for part in args.only.split(","):
            if part == "dryrun":
                rows += dryrun_rows(work)
            elif part in parts:
                rows += parts[part](args, work)
            else:
                raise SystemExit(f"unknown part '{part}' (collect, merge, dryrun)")
            log.info("after %s:\n%s", part, table(rows))
    print(table(rows))
    print(f"\nmachine: {machine()}")


if __name__ == "__main__":
    main()
