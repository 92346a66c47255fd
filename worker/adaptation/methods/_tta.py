"""Shared by the test-time methods: the base of the norm-affine methods (tent, eata, sar, roid),
optimizers with the reference library's settings, EMA teachers, masked means and the "last stage" of a
network (SAR).

Not a method: `_load_all` skips modules whose name starts with an underscore."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..errors import AdaptationError
from .base import Method, make_optimizer
from .norm import NORMS, freeze_all_but, norm_affine_params, use_batch_statistics


def tta_optimizer(params: list[nn.Parameter], p) -> torch.optim.Optimizer:
    """Adam (betas 0.9/0.999) or SGD with Nesterov momentum: mariodoebler/test-time-adaptation's setup."""
    return make_optimizer(params, p.optimizer, p.lr, p.momentum, 0.0, nesterov=True)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy with gradients off (EMA teacher, anchor). Keeps train/eval modes and memory format."""
    twin = copy.deepcopy(model)
    for q in twin.parameters():
        q.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update_(ema: list[torch.Tensor], new: list[torch.Tensor], momentum: float) -> None:
    """ema ← momentum·ema + (1 − momentum)·new, in place, fused over the list."""
    if ema:
        torch._foreach_lerp_(ema, new, 1.0 - momentum)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of `values` where `mask` (no host sync); 0 with a zero gradient when the mask is empty
    (where the reference takes the mean of an empty tensor: NaN, whose gradient is zero too).
    Returns (mean, count as float)."""
    m = mask.to(values.dtype)
    count = m.sum()
    return (values * m).sum() / count.clamp_min(1.0), count


def nothing_selected(mask: torch.Tensor) -> bool:
    """No sample selected, when the host can tell without waiting for the device (CPU tensors): the
    update is then skipped, as the reference skips it. On an accelerator the masked update runs
    instead (a zero-gradient no-op) rather than stalling the stream with a sync every step."""
    return mask.device.type == "cpu" and not bool(mask.any())


def symmetric_cross_entropy(x: torch.Tensor, x_ema: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Per-sample (1 − α)·CE(softmax(x_ema) → x) + α·CE(softmax(x) → x_ema), fp32."""
    x, x_ema = x.float(), x_ema.float()
    return -(1 - alpha) * (x_ema.softmax(1) * x.log_softmax(1)).sum(1) \
        - alpha * (x.softmax(1) * x_ema.log_softmax(1)).sum(1)


def collect_norm_params(method: Method, skip: tuple[str, ...] = ()) -> list[nn.Parameter]:
    params = [p for _, p in norm_affine_params(method.model, skip)]
    if not params:
        raise AdaptationError("no_norm_layers", f"{method.name} updates norm-layer affine parameters, "
                              "and the model has none (BatchNorm, LayerNorm or GroupNorm with affine=True)")
    return params


class NormAffineMethod(Method):
    """Base of the methods that adapt the norm layers' affine parameters (tent, eata, sar, roid): every
    layer in eval mode except BatchNorm, which normalises with the batch's statistics; everything but
    `norm_params` frozen; the reference library's optimizer (Adam, or SGD with Nesterov momentum)."""

    def configure(self) -> None:
        use_batch_statistics(self.model)
        self.norm_params = self.select_norm_params()
        freeze_all_but(self.model, self.norm_params)

    def select_norm_params(self) -> list[nn.Parameter]:
        """Which affine parameters adapt: all of them (SAR leaves out the last stage's)."""
        return collect_norm_params(self)

    def trainable_params(self) -> list[nn.Parameter]:
        return self.norm_params

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return tta_optimizer(params, self.params)


# --- SAR's "last stage" ----------------------------------------------------------------------------

LAST_STAGE_FRACTION = 0.25


def _has_norm(module: nn.Module) -> bool:
    return any(isinstance(m, NORMS) for m in module.modules())


def last_stage_prefixes(model: nn.Module) -> list[str]:
    """Module names of the network's top stage(s), whose norm layers SAR leaves alone.

    At each level: the children holding norm layers that are not norm layers themselves are the stages.
    One stage → it is a wrapper (`model.backbone`, a ViT's `blocks`): descend into it. Several → the last
    quarter of them (at least one) is the top: ResNet layer1-4 → layer4; WRN block1-3 → block3; a ViT's
    12 blocks → blocks.9-11 (the reference skips exactly these for ViT-Base). Norm layers that follow the
    top stage at any level (a ViT's final `norm`, a WRN's final `bn1`) are skipped with it. None → the
    last quarter of the norm layers themselves (a flat Sequential)."""
    skip: list[str] = []
    module, prefix = model, ""
    while True:
        children = [(name, child) for name, child in module.named_children() if _has_norm(child)]
        stages = [i for i, (_, child) in enumerate(children) if not isinstance(child, NORMS)]
        full = lambda name: f"{prefix}{name}"  # noqa: E731
        if len(stages) == 1:
            i = stages[0]
            skip += [full(name) for name, _ in children[i + 1:]]  # norms after the wrapper
            module, prefix = children[i][1], full(children[i][0]) + "."
            continue
        if not stages:
            k = math.ceil(LAST_STAGE_FRACTION * len(children)) if children else 0
            skip += [full(name) for name, _ in children[len(children) - k:]] if k else []
            return skip
        k = math.ceil(LAST_STAGE_FRACTION * len(stages))
        first = stages[len(stages) - k]
        skip += [full(name) for name, _ in children[first:]]
        return skip
