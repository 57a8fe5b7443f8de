"""The workflow steps that run a model or read an imatrix: one function per rule.

Collect and evaluate claim a GPU of their own (:func:`~imatrix.workflow.gpu.claim_gpu`)
before llama.cpp loads, which is why they import it inside the function.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from imatrix.errors import ImatrixError
from imatrix.formats import read_imatrix
from imatrix.workflow.gpu import claim_gpu
from imatrix.workflow.shards import dataset_chunks, shard_range

log = logging.getLogger(__name__)


def collect_shard(
    model: str,
    tokens: str,
    output: str,
    *,
    dataset: str,
    shard: int,
    shards: int,
    chunks_per_shard: int | None,
    chunks: int | None,
    n_ctx: int,
    n_batch: int,
    n_ubatch: int,
    process_output: bool,
    ppl: bool,
    ngl: int,
    threads: int,
    output_frequency: int,
) -> Path:
    """Collect one shard: the chunk range this shard owns, on a GPU of its own when
    layers are offloaded, resuming from ``<output>.checkpoint`` if a previous run of
    this job was killed."""
    n = dataset_chunks(tokens, n_ctx, chunks)
    first, last = shard_range(
        n, shard, shards=shards, chunks_per_shard=chunks_per_shard, dataset=f"dataset '{dataset}'"
    )
    log.info("dataset %s shard %d: chunks [%d, %d) of %d", dataset, shard, first, last, n)
    with claim_gpu(None if ngl > 0 else 0):
        # after the GPU is chosen: llama.cpp loads here
        from imatrix.collect import CollectSettings, StaleCheckpoint, checkpoint_path, collect

        settings = CollectSettings(
            first_chunk=first,
            last_chunk=last,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_ubatch=n_ubatch,
            threads=threads,
            n_gpu_layers=ngl,
            process_output=process_output,
            compute_ppl=ppl,
            output_frequency=output_frequency,
            resume=True,
        )

        def run() -> None:
            collect(model, tokens, output, settings, dataset=dataset)

        try:
            run()
        except StaleCheckpoint as exc:
            # killed under an older config: that work is obsolete, start this shard over
            log.warning("%s; discarding it and collecting this shard from the start", exc)
            checkpoint_path(output).unlink(missing_ok=True)
            run()
    return Path(output)


def evaluate_quants(
    base: str,
    quants: Sequence[str],
    texts: Mapping[str, str],
    output: str,
    *,
    n_ctx: int,
    chunks: int | None,
    threads: int,
    ngl: int,
) -> Path:
    """Evaluate a model's quantizations against its base on every evaluation set
    (name -> text) into one summary table, sets in the order given, its ``eval_set``
    column naming them (the base's logits are computed once per text for all quants),
    on a GPU of its own when layers are offloaded."""
    with claim_gpu(None if ngl > 0 else 0):
        import pandas as pd

        from imatrix.evaluate import evaluate, write_summary

        frames = []
        for name, text in texts.items():
            log.info("evaluation set %s: %s", name, text)
            frames.append(
                evaluate(
                    base,
                    list(quants),
                    text,
                    n_ctx=n_ctx,
                    chunks=chunks,
                    threads=threads,
                    n_gpu_layers=ngl,
                    eval_set=name,
                )
            )
        if not frames:
            raise ImatrixError("no evaluation text given (evaluate.text or evaluate.texts)")
        return write_summary(pd.concat(frames, ignore_index=True), output)


def imatrix_statistics(src: str, tensors: str, layers: str, plots: str) -> None:
    """Per-tensor and per-layer statistics of an imatrix as Parquet, and its plots."""
    from imatrix.plots import write_plots
    from imatrix.stats import compute_statistics, write_parquet

    data = read_imatrix(src)
    t, lay = compute_statistics(data)
    tp, lp = write_parquet(t, lay, Path(tensors).parent)
    if (str(tp), str(lp)) != (str(Path(tensors)), str(Path(layers))):
        raise ImatrixError(f"statistics tables must be named {tp.name} and {lp.name}")
    Path(plots).mkdir(parents=True, exist_ok=True)
    write_plots(data, t, plots)
