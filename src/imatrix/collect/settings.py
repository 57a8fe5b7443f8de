"""What a collection is asked to do (:class:`CollectSettings`) and what it reports
(:class:`CollectResult`).

Why a dataclass: the collector has two dozen knobs (llama-imatrix's flags plus ours);
as keyword arguments they were repeated in every caller and every helper. One frozen
value is passed around instead, validated once, and changed with
:func:`dataclasses.replace`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from imatrix.convergence import ConvergenceLog, StopRule
from imatrix.errors import ImatrixError
from imatrix.formats import FORMAT_GGUF, FORMATS
from imatrix.model import ImatrixData
from imatrix.perplexity import Perplexity


@dataclass(frozen=True)
class CollectSettings:
    """Settings of one collection; the defaults are llama-imatrix's.

    What is computed:
        ``first_chunk``/``last_chunk``: the chunk range ``[first, last)`` (``None``: every
        whole chunk); ``n_ctx``: chunk size in tokens; ``process_output``: also collect
        ``output.weight``; ``compute_ppl``: perplexity over the chunks.
    How it runs (never changes the result beyond float rounding order):
        ``n_batch``/``n_ubatch``: logical and physical batch; ``threads`` (None: physical
        cores); ``n_gpu_layers``; ``stop_early``: None lets the collector cut graphs after
        the last needed tensor whenever nothing needs logits, False never does (True is
        the same as None); ``reuse_inputs``: sum an input shared by consecutive matrices
        once (None: with a CPU-only llama.cpp build); ``sum_threads``: threads summing
        activations in the callback (None: 1 on the CPU backend, else ``threads``).
    What is written:
        ``output_frequency``: a checkpoint every N chunks (0: never); ``save_frequency``:
        ``<output>.at_<n>`` snapshots every N chunks (llama-imatrix's
        ``--save-frequency``); ``output_format`` (gguf or dat); ``compat``:
        llama-imatrix's GGUF layout only; ``resume``: continue from a checkpoint made
        with the same settings.
    Reporting:
        ``progress`` (None: a bar on a terminal); ``verbosity`` (llama-imatrix's ``-lv``).
    Ours:
        ``until_converged``: stop once the convergence record says so
        (:mod:`imatrix.convergence`; None: collect every chunk, as llama-imatrix).
    """

    first_chunk: int = 0
    last_chunk: int | None = None
    n_ctx: int = 512
    process_output: bool = False
    compute_ppl: bool = True
    n_batch: int = 2048
    n_ubatch: int = 512
    threads: int | None = None
    n_gpu_layers: int = -1
    stop_early: bool | None = None
    reuse_inputs: bool | None = None
    sum_threads: int | None = None
    output_frequency: int = 10
    save_frequency: int = 0
    output_format: str = FORMAT_GGUF
    compat: bool = False
    resume: bool = False
    progress: bool | None = None
    verbosity: int = 1
    until_converged: StopRule | None = None

    def validate(self) -> None:
        """Refuse settings no run can use (before any file is read)."""
        if self.output_format not in FORMATS:
            raise ImatrixError(f"unknown output format '{self.output_format}' (use gguf or dat)")

    @property
    def keeps_sums(self) -> bool:
        """The output stores plain activation sums (``in_sum``): llama-imatrix's formats
        (``--compat``, ``.dat``) do not, so a collection for them does not compute them."""
        return self.output_format == FORMAT_GGUF and not self.compat

    @property
    def may_stop_early(self) -> bool:
        """Graphs may be cut after the last needed tensor: nothing needs the logits."""
        return self.stop_early is not False and not self.compute_ppl and not self.process_output


@dataclass
class CollectResult:
    """What :func:`imatrix.collect.collect` returns."""

    data: ImatrixData
    perplexity: Perplexity | None
    #: absolute chunk range processed, [first, last)
    first_chunk: int
    last_chunk: int
    n_tokens: int
    #: whole call (model load included) and the chunk loop alone
    seconds: float
    compute_seconds: float
    #: True when graphs were cut after the last needed tensor
    stopped_early: bool
    resumed_from: int | None = None
    #: the convergence record (``last_chunk`` is where ``until_converged`` stopped)
    convergence: ConvergenceLog | None = None
    #: parts of compute_seconds: summing activations (in the callback), perplexity
    collect_seconds: float = 0.0
    ppl_seconds: float = 0.0
    outputs: list[Path] = field(default_factory=list)
    #: decodes that ended by abort right after the last needed tensor (no logits copied)
    aborted_decodes: int = 0


__all__ = ["CollectResult", "CollectSettings"]
