"""Built-in architecture registry.

Every entry builds an `nn.Module` whose state-dict keys are identical to the original implementation's,
so a checkpoint people already have loads as-is. Entries are looked up by name; duplicates and unknown
names fail loudly.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register_architecture(name: str):
    def wrap(factory: Callable[..., nn.Module]):
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is registered twice")
        ARCHITECTURES[name] = factory
        return factory

    return wrap


class UnknownArchitecture(KeyError):
    pass


def build_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    _ensure_builtins_loaded()
    try:
        factory = ARCHITECTURES[name]
    except KeyError:
        raise UnknownArchitecture(
            f"unknown architecture {name!r}; built in: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
    return factory(num_classes=num_classes, **kwargs)


def classifier_of(model: nn.Module) -> nn.Linear:
    """The final linear layer (SFDA methods freeze it). Built-ins name it via `classifier_name`;
    otherwise the last `nn.Linear` in registration order."""
    name = getattr(model, "classifier_name", None)
    if name:
        return model.get_submodule(name)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear classifier")
    return linears[-1]


def forward_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model once and return (features entering the classifier, logits)."""
    if hasattr(model, "forward_features") and getattr(model, "classifier_name", None):
        feats = model.forward_features(x)
        return feats, classifier_of(model)(feats)
    captured: list[torch.Tensor] = []
    handle = classifier_of(model).register_forward_pre_hook(lambda _m, inp: captured.append(inp[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return captured[-1].flatten(1), logits


def _ensure_builtins_loaded() -> None:
    # Importing the modules runs their @register_architecture decorators.
    from . import digit_cnn, resnet, vit, wide_resnet  # noqa: F401
