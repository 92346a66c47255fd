"""TENT (Wang et al., ICLR 2021): minimise the mean prediction entropy over the norm layers' affine
parameters, with batch statistics in BatchNorm."""
from __future__ import annotations

import torch

from app.contract.catalog.tta import TentParams

from ..errors import AdaptationError
from ._tta import eval_prediction, needs_eval_fallback
from .base import Method, StepOutput, softmax_entropy
from .norm import freeze_all_but, norm_affine_params, use_batch_statistics
from .registry import implements


def collect_norm_params(method: Method, skip: tuple[str, ...] = ()) -> list[torch.nn.Parameter]:
    params = [p for _, p in norm_affine_params(method.model, skip)]
    if not params:
        raise AdaptationError("no_norm_layers", f"{method.name} updates norm-layer affine parameters, "
                              "and the model has none (BatchNorm, LayerNorm or GroupNorm with affine=True)")
    return params


@implements(TentParams)
class Tent(Method):
    needs_norm_layers = True

    def configure(self) -> None:
        use_batch_statistics(self.model)
        freeze_all_but(self.model, collect_norm_params(self))

    def trainable_params(self) -> list[torch.nn.Parameter]:
        return collect_norm_params(self)

    def step(self, x: torch.Tensor, index: torch.Tensor) -> StepOutput:
        if needs_eval_fallback(self, x):  # e.g. a last batch of one image
            return eval_prediction(self, self.model, x)
        for _ in range(self.params.steps):
            with self.ctx.autocast():
                logits = self.model(x)
            loss = softmax_entropy(logits).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return StepOutput(logits.detach().float(), loss.detach())
