"""`source`: the uploaded model, unchanged, in eval mode."""
from __future__ import annotations

import torch

from app.contract.catalog.baselines import SourceParams

from .base import Method, StepOutput, float_output
from .registry import implements


@implements(SourceParams)
class Source(Method):
    uses_batch_statistics = False

    @torch.no_grad()
    def step(self, x: torch.Tensor, index: torch.Tensor) -> StepOutput:
        with self.ctx.autocast():
            return StepOutput(float_output(self.model(x)))
