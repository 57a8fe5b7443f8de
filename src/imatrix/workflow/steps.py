"""The workflow steps that run a model or read an imatrix: one function per rule.

Collect and evaluate claim a GPU of their own (:func:`~imatrix.workflow.gpu.claim_gpu`)
before llama.cpp loads, which is why they import it inside the function.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from imatrix.convergence import ConvergenceLog
from imatrix.errors import ImatrixError
from imatrix.formats import read_imatrix
from imatrix.workflow.config import check_until_converged
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
    until_converged: str | float | None = None,
) -> Path:
    """Collect one shard: the chunk range this shard owns, on a GPU of its own when
    layers are offloaded, resuming from ``<output>.checkpoint`` if a previous run of
    this job was killed; with ``until_converged`` (config ``collect.until_converged``)
    the shard stops once its convergence record says so, and its imatrix records the
    chunks it used."""
    rule = check_until_converged(until_converged)
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
            until_converged=rule,
        )

        def run() -> None:
            res = collect(model, tokens, output, settings, dataset=dataset)
            _log_chunks_used(res.convergence, f"dataset {dataset} shard {shard}", last - first)

        try:
            run()
        except StaleCheckpoint as exc:
            # killed under an older config: that work is obsolete, start this shard over
            log.warning("%s; discarding it and collecting this shard from the start", exc)
            checkpoint_path(output).unlink(missing_ok=True)
            run()
    return Path(output)


def _log_chunks_used(conv: ConvergenceLog | None, what: str, planned: int) -> None:
    if conv is not None and conv.stopped_at is not None:
        log.info("%s converged: used %d of %d chunks", what, conv.chunks_used, planned)


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
    recipes: Mapping[str, str] | None = None,
) -> Path:
    """Evaluate a model's quantizations against its base on every evaluation set
    (name -> text) into one summary table, sets in the order given, its ``eval_set``
    column naming them (the base's logits are computed once per text for all quants),
    on a GPU of its own when layers are offloaded. ``recipes``: quant -> the plan that
    made it."""
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
                    recipes=recipes,
                    eval_set=name,
                )
            )
        if not frames:
            raise ImatrixError("no evaluation text given (evaluate.text or evaluate.texts)")
        return write_summary(pd.concat(frames, ignore_index=True), output)


def quantize_step(
    model: str,
    output: str,
    qtype: str | None,
    *,
    imatrix: str | None,
    recipe: str | None,
    threads: int,
    allow_requantize: bool,
) -> Path:
    """One quant: the stock ``qtype`` (with the imatrix when given), or a plan's recipe
    with the ftype its sidecar names (``qtype`` None)."""
    if recipe is not None:
        from imatrix.workflow.plans import quantize_recipe

        if imatrix is None:
            raise ImatrixError(f"{recipe}: a planned quant needs the imatrix it was planned with")
        return quantize_recipe(
            model, imatrix, recipe, output, threads=threads, allow_requantize=allow_requantize
        )
    if qtype is None:
        raise ImatrixError(f"{output}: neither a quant type nor a recipe given")
    from imatrix.quantize import quantize

    return quantize(
        model,
        output,
        qtype,
        imatrix=imatrix,
        threads=threads,
        allow_requantize=allow_requantize,
    )


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


def convergence_statistics(
    shards: Sequence[str], datasets: Sequence[str], table: str, plot: str, *, eps: float
) -> None:
    """Every shard's convergence record and their merged view (``convergence.parquet``),
    and its plot. A shard's index is its file name (``{s}.gguf``)."""
    from imatrix.convergence_plot import plot_convergence
    from imatrix.convergence_table import convergence_table, read_log, write_convergence_parquet

    if len(shards) != len(datasets):
        raise ImatrixError(f"{len(shards)} shards for {len(datasets)} dataset names")
    logs = []
    for path, dataset in zip(shards, datasets, strict=True):
        conv = read_log(read_imatrix(path), path)
        if conv is None:
            log.warning("%s has no convergence record", path)
            continue
        logs.append((dataset, int(Path(path).stem), conv))
    df = convergence_table(logs)
    write_convergence_parquet(df, table)
    m = Path(table).parent.parent.name
    plot_convergence(df, plot, eps=eps, title=f"convergence of the shards of {m}")
