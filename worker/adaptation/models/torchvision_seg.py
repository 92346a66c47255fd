"""torchvision's segmentation models under their builder names, their checkpoints loaded as-is (same keys,
`aux_classifier.*` included when built with `aux_loss=True`). They return a dict {"out", "aux"}; the engine
works on tensors, so each model's class is swapped for a subclass whose forward returns `out` only: the
state-dict keys, deepcopy (teachers) and the export stay exactly torchvision's. Nothing is downloaded:
`weights` and `weights_backbone` are refused."""
from __future__ import annotations

from functools import cache

from torch import nn

from ..errors import AdaptationError
from .registry import register_architecture

BUILDERS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50", "fcn_resnet50")
REFUSED_KWARGS = frozenset({"weights", "weights_backbone", "progress", "num_classes"})


@cache
def _out_only(cls: type[nn.Module]) -> type[nn.Module]:
    def forward(self, x):
        return cls.forward(self, x)["out"]

    return type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})


def _factory(name: str):
    def build(num_classes: int, **kwargs) -> nn.Module:
        from torchvision.models import segmentation

        refused = sorted(REFUSED_KWARGS & set(kwargs))
        if refused:
            raise AdaptationError("invalid_arch_kwargs", f"{name} takes no {', '.join(refused)} here: upload the "
                                  "checkpoint instead (nothing is downloaded)", {"refused": refused})
        try:
            model = getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=num_classes,
                                                **kwargs)
        except TypeError as exc:
            raise AdaptationError("invalid_arch_kwargs", f"{name}: {exc}") from None
        model.__class__ = _out_only(type(model))
        return model

    build.__name__ = name
    return build


for _name in BUILDERS:
    register_architecture(_name)(_factory(_name))
