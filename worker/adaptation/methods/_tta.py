"""Shared by the test-time methods eata, sar, cotta, rmt and roid: optimizers with the reference
library's settings, EMA teachers, masked means, the "last stage" of a network (SAR), and the
prediction for a batch too small for batch statistics.

Not a method: `_load_all` skips modules whose name starts with an underscore."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .base import Method, StepOutput, make_optimizer
from .norm import NORMS, has_batch_norm


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


def needs_eval_fallback(method: Method, x: torch.Tensor) -> bool:
    """A batch of one image cannot be normalised with batch statistics (BatchNorm1d refuses it; the
    last batch of a dataset can be that small even when batch_size ≥ 2)."""
    return x.shape[0] < 2 and has_batch_norm(method.model)


@torch.no_grad()
def eval_prediction(method: Method, model: nn.Module, x: torch.Tensor) -> StepOutput:
    """Predict without adapting, BatchNorm on its running statistics (which tracked the target while
    adapting); train/eval modes are restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with method.ctx.autocast():
            logits = model(x).float()
    finally:
        for m, t in modes.items():
            m.train(t)
    return StepOutput(logits)


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
