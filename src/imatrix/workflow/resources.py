"""What each workflow job asks its executor for: memory, runtime, a GPU.

Decided here, once: the rules take these requests from this module (through
``workflow/rules/common.smk``) and the SLURM profile adds only what belongs to a site
(partition, account, GPU model, signals), so a job asks for the same on every executor
and the numbers are tested without Snakemake.

- Memory: the copies of its inputs a step holds (the model is memory-mapped, and
  quantization holds the input and the output), plus a fixed overhead for llama.cpp's
  compute and logits buffers and the Python process; multiplied by the attempt, so a
  job killed for memory is retried with more.
- Runtime: minutes per step. A retried job gets more time, except collect: a collect
  job stopped at its time limit resumes from its checkpoint, so the same time makes
  progress, and a longer request could exceed the partition's MaxTime and be refused
  by sbatch.
- GPU: one device for a job that offloads layers (``ngl > 0``), none otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from imatrix.errors import ImatrixError

#: Memory beyond the copies of the inputs, MiB.
MEM_OVERHEAD_MB = 2048


@dataclass(frozen=True)
class StepResources:
    """The requests of one step's jobs."""

    #: copies of the job's inputs held in memory at once
    input_copies: float
    #: minutes a first attempt may run
    runtime_min: int
    #: a retry continues from a checkpoint, so its runtime does not grow
    resumes: bool = False


#: Every step that runs as a cluster job (the others are local rules).
STEPS: dict[str, StepResources] = {
    "base_model": StepResources(input_copies=4, runtime_min=30),
    "collect": StepResources(input_copies=2, runtime_min=240, resumes=True),
    "merge": StepResources(input_copies=2, runtime_min=30),
    "stats": StepResources(input_copies=2, runtime_min=30),
    # the merged imatrix and one shard at a time (inputs: the merge and all shards)
    "coverage": StepResources(input_copies=1, runtime_min=30),
    "quantize": StepResources(input_copies=2, runtime_min=60),
    # the calibration quantizes a dozen models beside the base and evaluates them at once
    "plan_estimates": StepResources(input_copies=8, runtime_min=120),
    "plan": StepResources(input_copies=2, runtime_min=30),
    "evaluate": StepResources(input_copies=1, runtime_min=120),
    "generate_dataset": StepResources(input_copies=1, runtime_min=120),
}


def _step(name: str) -> StepResources:
    try:
        return STEPS[name]
    except KeyError:
        raise ImatrixError(
            f"no resources defined for step '{name}' (known: {', '.join(STEPS)})"
        ) from None


def mem_mb(step: str, input_mb: float, attempt: int = 1) -> int:
    """``mem_mb`` of a job of ``step`` whose inputs total ``input_mb`` MiB."""
    copies = _step(step).input_copies
    return (int(max(input_mb, 1.0) * copies) + MEM_OVERHEAD_MB) * max(attempt, 1)


def runtime_min(step: str, attempt: int = 1) -> int:
    """``runtime`` (minutes) of a job of ``step`` on its ``attempt``-th try."""
    res = _step(step)
    return res.runtime_min if res.resumes else res.runtime_min * max(attempt, 1)


def gpu_count(ngl: int) -> int:
    """``gpu`` of a job offloading ``ngl`` layers: 1 if any, else 0 (no GPU requested)."""
    return 1 if ngl > 0 else 0
