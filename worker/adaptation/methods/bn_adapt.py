"""`bn_adapt` (BN-1 / AdaBN): normalise each batch with its own statistics; no gradients.

The export re-estimates the running statistics over the whole target set, which is AdaBN. A detector's
frozen backbone BatchNorm (FrozenBatchNorm2d) is turned into BatchNorm2d for that (same statistics and
affine weights, marked); the detection task freezes those layers again after re-estimating them, so the
exported detector has torchvision's layers and keys with target statistics."""
from __future__ import annotations

import torch

from app.contract.catalog.baselines import BNAdaptParams

from ..errors import AdaptationError
from ..models.torchvision_det import has_frozen_bn, unfreeze_bn
from .base import Method, StepOutput, float_output
from .norm import has_batch_norm, use_batch_statistics
from .registry import implements


@implements(BNAdaptParams)
class BNAdapt(Method):
    def check_compatible(self) -> None:
        if not has_batch_norm(self.model) and not has_frozen_bn(self.model):
            raise AdaptationError("no_norm_layers", "bn_adapt needs a model with BatchNorm layers")
        super().check_compatible()

    def configure(self) -> None:
        unfreeze_bn(self.model)  # detectors: their frozen statistics follow the target too
        super().configure()
        use_batch_statistics(self.model)

    @torch.no_grad()
    def step(self, x: torch.Tensor, index: torch.Tensor) -> StepOutput:
        with self.ctx.autocast():
            return StepOutput(float_output(self.model(x)))
