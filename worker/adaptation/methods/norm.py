"""Helpers shared by the norm-layer methods: find norm layers, put them in the right mode."""
from __future__ import annotations

from torch import nn

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
NORMS = BATCH_NORMS + (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d)


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, NORMS)]


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, BATCH_NORMS) for m in model.modules())


def use_batch_statistics(model: nn.Module) -> None:
    """Everything in eval mode (dropout off) except BatchNorm, which normalises with the current
    batch's statistics. Running statistics keep updating; the export re-estimates them anyway."""
    model.eval()
    for m in model.modules():
        if isinstance(m, BATCH_NORMS):
            m.train()


def norm_affine_params(model: nn.Module, skip: tuple[str, ...] = ()) -> list[tuple[str, nn.Parameter]]:
    """The affine (weight, bias) parameters of every norm layer, except those under a `skip` prefix."""
    out = []
    for name, m in norm_layers(model):
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        for pname, p in m.named_parameters(recurse=False):
            out.append((f"{name}.{pname}", p))
    return out


def freeze_all_but(model: nn.Module, params: list[nn.Parameter]) -> None:
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
