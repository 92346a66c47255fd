"""torchvision's detectors under their builder names, their checkpoints loaded as-is, and `fcos_small`, a
CPU-sized torchvision FCOS for the tests and benchmarks. NMS, RoIAlign, anchors, box coding and losses are
torchvision's own: nothing here reimplements them.

BatchNorm. torchvision builds a detector's backbone body with `FrozenBatchNorm2d` when it loads a checkpoint
(`weights`/`weights_backbone` given) and with `BatchNorm2d` otherwise; nothing is downloaded here
(`weights=None, weights_backbone=None`), so the body's BatchNorm2d layers are frozen afterwards (`freeze_bn`):
the model is the one torchvision builds for its COCO checkpoints, same keys (no `num_batches_tracked` in
the body; a checkpoint that has them, trained from scratch with BatchNorm2d, loads too: FrozenBatchNorm2d
drops them). Layers torchvision keeps as BatchNorm2d even for trained models (the FPN and box head of the
`_v2` models, all of SSDlite) stay BatchNorm2d. `unfreeze_bn` / `freeze_bn` turn the frozen layers into
BatchNorm2d and back (same statistics and affine weights): `bn_adapt` and the fixed-pseudo-label baseline
re-estimate the frozen statistics on the target that way (AdaBN), and the training helper trains a source
detector with live BatchNorm.

The v1 COCO checkpoints of `fasterrcnn_resnet50_fpn` / `retinanet_resnet50_fpn` were trained with
FrozenBatchNorm2d eps = 0 (torchvision's `overwrite_eps(model, 0.0)` when it loads them); here eps stays
1e-5, a difference of 1e-5 in the variance."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from app.contract.architectures import TORCHVISION_DETECTORS

from ..errors import AdaptationError
from .registry import register_architecture

REFUSED_KWARGS = frozenset({"weights", "weights_backbone", "progress", "num_classes"})
_UNFROZEN = "_adaptd_unfrozen"  # marks the BatchNorm2d layers `unfreeze_bn` made from FrozenBatchNorm2d


def freeze_bn(module: nn.Module, only_marked: bool = False) -> int:
    """Replace BatchNorm2d layers under `module` by FrozenBatchNorm2d with the same statistics and affine
    weights (in place; returns how many). `only_marked`: only those `unfreeze_bn` made."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d) and (not only_marked or getattr(child, _UNFROZEN, False)):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight.detach())
                frozen.bias.copy_(child.bias.detach())
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            frozen.to(child.weight.device)
            setattr(module, name, frozen)
            count += 1
        else:
            count += freeze_bn(child, only_marked)
    return count


def unfreeze_bn(module: nn.Module) -> int:
    """Replace FrozenBatchNorm2d layers by BatchNorm2d (same statistics, affine weights without gradients
    unless asked for later), marked so `freeze_bn(only_marked=True)` turns exactly them back."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, FrozenBatchNorm2d):
            n = child.weight.shape[0]
            bn = nn.BatchNorm2d(n, eps=child.eps).to(child.weight.device)
            with torch.no_grad():
                bn.weight.copy_(child.weight)
                bn.bias.copy_(child.bias)
                bn.running_mean.copy_(child.running_mean)
                bn.running_var.copy_(child.running_var)
            bn.weight.requires_grad_(False)
            bn.bias.requires_grad_(False)
            setattr(bn, _UNFROZEN, True)
            setattr(module, name, bn)
            count += 1
        else:
            count += unfreeze_bn(child)
    return count


def has_frozen_bn(model: nn.Module) -> bool:
    from torchvision.ops.misc import FrozenBatchNorm2d

    return any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())


def _refuse(name: str, kwargs: dict) -> None:
    refused = sorted(REFUSED_KWARGS & set(kwargs))
    if refused:
        raise AdaptationError("invalid_arch_kwargs", f"{name} takes no {', '.join(refused)} here: upload the "
                              "checkpoint instead (nothing is downloaded)", {"refused": refused})


def _factory(name: str, frozen_body: bool):
    def build(num_classes: int, **kwargs) -> nn.Module:
        from torchvision.models import detection

        _refuse(name, kwargs)
        try:
            model = getattr(detection, name)(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
        except TypeError as exc:
            raise AdaptationError("invalid_arch_kwargs", f"{name}: {exc}") from None
        if frozen_body:
            freeze_bn(model.backbone.body)
        return model

    build.__name__ = name
    return build


for _name, _ in TORCHVISION_DETECTORS:
    # SSDlite is trained with live BatchNorm2d everywhere (torchvision builds it so with weights too).
    register_architecture(_name)(_factory(_name, frozen_body=not _name.startswith("ssdlite")))


class SmallBackbone(nn.Module):
    """Three stride-2 conv-BN-ReLU stages (strides 2, 4, 8) and torchvision's FeaturePyramidNetwork over the
    last two: an OrderedDict of two 32-channel maps, the form torchvision's detectors take."""

    def __init__(self, in_channels: int = 3, width: int = 16, out_channels: int = 32):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        def stage(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                 nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.body = nn.ModuleDict({"stage1": stage(in_channels, width), "stage2": stage(width, 2 * width),
                                   "stage3": stage(2 * width, 4 * width)})
        self.fpn = FeaturePyramidNetwork([2 * width, 4 * width], out_channels)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        s1 = self.body["stage1"](x)
        s2 = self.body["stage2"](s1)
        s3 = self.body["stage3"](s2)
        return self.fpn(OrderedDict([("0", s2), ("1", s3)]))


@register_architecture("fcos_small")
def fcos_small(num_classes: int = 11, width: int = 16, min_size: int = 48, max_size: int = 48, **kwargs) -> nn.Module:
    """torchvision's FCOS (head with 2 GroupNorm convs, its anchor-point assignment, losses and NMS) on
    `SmallBackbone`; one anchor point per location, sizes 4 and 8 = the strides (FCOS's convention):
    objects up to 32 px go to the stride-4 level."""
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSHead

    _refuse("fcos_small", kwargs)
    backbone = SmallBackbone(width=width)
    freeze_bn(backbone.body)
    anchors = AnchorGenerator(((4,), (8,)), ((1.0,), (1.0,)))
    head = FCOSHead(backbone.out_channels, 1, num_classes, num_convs=2)
    try:
        return FCOS(backbone, num_classes, min_size=min_size, max_size=max_size, anchor_generator=anchors, head=head,
                    **kwargs)
    except TypeError as exc:
        raise AdaptationError("invalid_arch_kwargs", f"fcos_small: {exc}") from None
