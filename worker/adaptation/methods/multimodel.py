"""Registry bindings of the methods that run a whole job over several models (catalogue kinds
`multisource` and `auto`). They have no per-batch hooks: `worker.adaptation.multisource_run.execute`
hands their jobs to `run_distill` / `run_auto`."""
from __future__ import annotations

from app.contract.catalog.multimodel import AutoParams, DistillNearestParams, DistillWeightedParams

from .registry import implements


class WholeJob:
    """A method that runs a whole job (see `multisource_run`), not a `Method` driven per batch."""


@implements(DistillNearestParams)
class DistillNearest(WholeJob):
    pass


@implements(DistillWeightedParams)
class DistillWeighted(WholeJob):
    pass


@implements(AutoParams)
class Auto(WholeJob):
    pass
