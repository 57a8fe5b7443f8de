"""``imatrix info``: what an imatrix file holds (datasets, chunks, tensors, experts, provenance)."""

from __future__ import annotations

import argparse
import sys

from imatrix.cli import add_dat_chunk_size, add_verbosity, check_ctx_size
from imatrix.formats import describe, read_imatrix
from imatrix.jsonout import dumps


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("info", help="describe an imatrix file")
    p.add_argument("input", metavar="IN", help="imatrix file (GGUF or .dat)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_dat_chunk_size(p)
    add_verbosity(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_ctx_size(args.ctx_size)
    data = read_imatrix(args.input, chunk_size=args.ctx_size, strict=False)
    info = describe(data, args.input)
    if args.json:
        sys.stdout.write(dumps(info, indent=2) + "\n")
        return 0
    lines = [
        f"file:        {info['file']} ({info['format']})",
        f"datasets:    {', '.join(info['datasets']) or '-'}",
        f"chunks:      {info['chunk_count']} x {info['chunk_size']} tokens",
        f"tensors:     {info['tensors']} ({info['moe_tensors']} with experts, up to {info['experts']})",
        f"in_sum:      {'yes' if info['has_activation_sums'] else 'no'}",
    ]
    dead = info["entries_with_unused_experts"]
    if dead:
        lines.append(f"unused experts in {len(dead)} tensors")
    prov = info["provenance"]
    if prov["model_sha256"]:
        lines.append(f"model:       sha256 {prov['model_sha256']}")
    for sha in prov["dataset_sha256"]:
        lines.append(f"dataset:     sha256 {sha}")
    for name, sel in zip(info["datasets"], prov["dataset_selection"], strict=True):
        if sel:  # imatrix.sampling's record
            n, sample = sel["chunks_available"], sel["sample"]
            how = (
                f"{sample['chunks']} of {n} chunks, seed {sample['seed']}"
                if sample
                else f"{n} chunks"
            )
            lines.append(f"selection:   {name}: {how}, boundary {sel['boundary']}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
