"""SAR (Niu et al., ICLR 2023): sharpness-aware and reliable entropy minimisation.

Per batch, on the norm layers' affine parameters outside the network's last stage:
1. forward; entropy H; loss₁ = mean H over the reliable samples (H < E0 = e_margin·ln C); backward;
2. SAM ascent: θ ← θ + ρ·g/‖g‖ (‖·‖ over all adapted parameters);
3. forward again at the perturbed θ; loss₂ = mean H over the samples reliable in BOTH passes; backward;
4. θ ← the saved θ, then one step of the base optimizer (SGD, momentum 0.9) with the gradient of step 3;
5. EMA(0.9) of loss₂ (only over batches where some sample was reliable); when it falls below
   reset_constant_em the model returns to the source weights, the momentum is cleared and the EMA
   forgotten — a "model recovery" (counted in `metrics.method_report.resets` and logged per step as
   `reset`).

The prediction returned is the first pass's (the model before this batch's update).

No host sync: filters are masks, the recovery is a `torch.where` between the current and the source
values (the affine parameters are a small fraction of the network), the EMA and its validity flag are
device tensors. Clearing the momentum buffer is equivalent to the reference's fresh optimizer (torch's
SGD starts a buffer as the first gradient; 0.9·0 + g is the same).

Skipped layers: `skip_modules`, or by default `_tta.last_stage_prefixes` (ResNet layer4, WRN block3 +
final bn, ViT last quarter of blocks + final norm, DigitCNN bottleneck). If that would leave nothing to
adapt, every norm layer is adapted."""
from __future__ import annotations

import math
from typing import Any

import torch

from app.contract.catalog.tta import SARParams

from ..errors import AdaptationError
from ._tta import NormAffineMethod, collect_norm_params, last_stage_prefixes, masked_mean
from .base import StepOutput, make_optimizer, softmax_entropy
from .norm import norm_affine_params
from .registry import implements

EMA_MOMENTUM = 0.9


@implements(SARParams)
class SAR(NormAffineMethod):
    state_attrs = ("loss_ema", "loss_ema_valid")

    def select_norm_params(self) -> list[torch.nn.Parameter]:
        collect_norm_params(self)  # refuses models without norm layers
        skip = self.params.skip_modules
        self.skipped = list(last_stage_prefixes(self.model) if skip is None else skip)
        named = norm_affine_params(self.model, tuple(self.skipped))
        if not named:
            if skip is not None:
                raise AdaptationError("no_norm_layers", "sar: skip_modules leaves no norm layer to adapt",
                                      {"skip_modules": skip})
            self.skipped = []
            named = norm_affine_params(self.model)
        self.adapted_names = [n for n, _ in named]
        return [q for _, q in named]

    def configure(self) -> None:
        super().configure()
        self.source_params = [q.detach().clone() for q in self.norm_params]
        self.e0 = self.params.e_margin * math.log(self.ctx.num_classes)
        dev = self.ctx.device
        self.loss_ema = torch.zeros((), device=dev)
        self.loss_ema_valid = torch.zeros((), dtype=torch.bool, device=dev)
        self.resets = torch.zeros((), device=dev)

    def build_optimizer(self, params):
        return make_optimizer(params, "sgd", self.params.lr, self.params.momentum)  # plain SGD, as SAR's authors

    def _entropy(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.ctx.autocast():
            logits = self.model(x)
        logits = logits.float()
        return logits, softmax_entropy(logits)

    def step(self, x: torch.Tensor, index: torch.Tensor) -> StepOutput:
        params = self.norm_params
        self.optimizer.zero_grad(set_to_none=True)
        logits, ent = self._entropy(x)
        reliable = ent.detach() < self.e0
        loss1, n1 = masked_mean(ent, reliable)
        loss1.backward()

        with torch.no_grad():  # SAM ascent to θ + ρ·g/‖g‖
            grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in params]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            saved = [q.detach().clone() for q in params]
            torch._foreach_add_(params, torch._foreach_mul(grads, self.params.rho / (norm + 1e-12)))
        self.optimizer.zero_grad(set_to_none=True)

        _, ent2 = self._entropy(x)
        reliable2 = reliable & (ent2.detach() < self.e0)
        loss2, n2 = masked_mean(ent2, reliable2)
        loss2.backward()
        with torch.no_grad():
            torch._foreach_copy_(params, saved)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        reset = self._recover(loss2.detach(), n2 > 0)
        return StepOutput(logits.detach(), loss2.detach(),
                          {"reliable": n1.detach(), "reliable_both_passes": n2.detach(),
                           "loss_first_pass": loss1.detach(), "loss_ema": self.loss_ema.clone(),
                           "reset": reset.float()})

    @torch.no_grad()
    def _recover(self, loss2: torch.Tensor, has_samples: torch.Tensor) -> torch.Tensor:
        """Update the EMA of loss₂; reset to the source weights when it falls below the threshold."""
        mixed = torch.where(self.loss_ema_valid, EMA_MOMENTUM * self.loss_ema + (1 - EMA_MOMENTUM) * loss2, loss2)
        self.loss_ema = torch.where(has_samples, mixed, self.loss_ema)
        self.loss_ema_valid = self.loss_ema_valid | has_samples
        reset = self.loss_ema_valid & (self.loss_ema < self.params.reset_constant_em)
        for q, src in zip(self.norm_params, self.source_params):
            q.copy_(torch.where(reset, src, q))
            buf = self.optimizer.state.get(q, {}).get("momentum_buffer")
            if buf is not None:
                buf.mul_((~reset).to(buf.dtype))
        self.loss_ema_valid = self.loss_ema_valid & ~reset
        self.resets += reset.float()
        return reset

    def report(self) -> dict[str, Any]:
        return {"resets": int(self.resets.item()), "skipped_modules": self.skipped,
                "adapted_parameters": len(self.adapted_names), "e_margin_nats": self.e0}
