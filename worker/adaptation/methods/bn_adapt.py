"""`bn_adapt` (BN-1 / AdaBN): normalise each batch with its own statistics; no gradients.

The export re-estimates the running statistics over the whole target set, which is AdaBN."""
from __future__ import annotations

import torch

from app.contract.catalog.baselines import BNAdaptParams

from ..errors import AdaptationError
from .base import Method, StepOutput
from .norm import has_batch_norm, use_batch_statistics
from .registry import implements


@implements(BNAdaptParams)
class BNAdapt(Method):
    def check_compatible(self) -> None:
        if not has_batch_norm(self.model):
            raise AdaptationError("no_norm_layers", "bn_adapt needs a model with BatchNorm layers")
        super().check_compatible()

    def configure(self) -> None:
        super().configure()
        use_batch_statistics(self.model)

    @torch.no_grad()
    def step(self, x: torch.Tensor, index: torch.Tensor) -> StepOutput:
        with self.ctx.autocast():
            return StepOutput(self.model(x).float())
