"""A collection job: everything fixed before the first decode.

What is computed (the chunk plan and settings), from what (model, tokens, a base
imatrix from ``--in-file``), what it is recorded as (dataset name, provenance), where
it goes (output, checkpoint), and the signature a checkpoint must match.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imatrix.collect.checkpoint import Signature, checkpoint_path, signature
from imatrix.collect.plan import ChunkPlan, load_token_source, plan_chunks, provenance_for
from imatrix.collect.settings import CollectSettings
from imatrix.model import Entry, ImatrixData, Provenance


@dataclass(frozen=True)
class Job:
    model: str | Path
    plan: ChunkPlan
    settings: CollectSettings
    dataset: str | None
    provenance: Provenance
    base: ImatrixData | None
    output: str | Path | None
    signature: Signature

    @property
    def checkpoint(self) -> Path | None:
        return None if self.output is None else checkpoint_path(self.output)

    @property
    def base_datasets(self) -> list[str]:
        return list(self.base.datasets) if self.base is not None else []

    def _selections(self) -> list[str]:
        """Per dataset of the output: the base's selections, then this job's."""
        own = self.provenance.dataset_selection or [""]
        out = (self.base.selections() if self.base else []) + (own if self.dataset else [])
        return out if any(out) else []

    def data(
        self, entries: dict[str, Entry], reached: int | None, convergence: str | None = None
    ) -> ImatrixData:
        """The imatrix of ``entries`` as this job records it (``reached``: the chunk a
        checkpoint has reached, None for the output; ``convergence``: the record's JSON)."""
        prov, base = self.provenance, self.base
        data = ImatrixData(
            entries=entries,
            datasets=self.base_datasets + ([self.dataset] if self.dataset else []),
            chunk_size=self.plan.n_ctx,
            provenance=Provenance(
                model_sha256=prov.model_sha256,
                dataset_sha256=list(base.provenance.dataset_sha256 if base else [])
                + list(prov.dataset_sha256),
                tokenizer=prov.tokenizer,
                version=prov.version,
                chunk_reached=reached,
                convergence=convergence,
                dataset_selection=self._selections(),
            ),
        )
        data.chunk_count = data.derived_chunk_count()
        return data


def prepare_job(
    model: str | Path,
    tokens: str | Path | np.ndarray,
    output: str | Path | None,
    settings: CollectSettings,
    *,
    dataset: str | None,
    provenance: Provenance | None,
    base: ImatrixData | None,
) -> Job:
    """Validate the settings, load the tokens and plan the chunks (no model is loaded)."""
    settings.validate()
    source = load_token_source(tokens, dataset)
    plan = plan_chunks(source.tokens, settings)
    prov = provenance_for(provenance, source.meta)
    rule = settings.until_converged
    sig = signature(
        model_sha=prov.model_sha256,
        tokens=source.tokens,
        n_ctx=plan.n_ctx,
        first=plan.first,
        last=plan.last,
        dataset=source.dataset,
        process_output=settings.process_output,
        base=base,
        until_converged=None if rule is None else rule.as_dict(),
        sums=settings.keeps_sums,
    )
    return Job(model, plan, settings, source.dataset, prov, base, output, sig)


__all__ = ["Job", "prepare_job"]
