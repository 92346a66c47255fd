"""TENT (Wang et al., ICLR 2021): minimise the mean prediction entropy over the norm layers' affine
parameters, with batch statistics in BatchNorm."""
from __future__ import annotations

import torch

from app.contract.catalog.tta import TentParams

from ._tta import NormAffineMethod
from .base import StepOutput, make_optimizer, softmax_entropy
from .registry import implements


@implements(TentParams)
class Tent(NormAffineMethod):
    def build_optimizer(self, params):
        p = self.params  # TENT's own setup: no Nesterov momentum (unlike the reference library's)
        return make_optimizer(params, p.optimizer, p.lr, p.momentum, p.weight_decay)

    def step(self, x: torch.Tensor, index: torch.Tensor) -> StepOutput:
        for _ in range(self.params.steps):
            with self.ctx.autocast():
                logits = self.model(x)
            loss = softmax_entropy(logits).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return StepOutput(logits.detach().float(), loss.detach())
