"""Architecture registry.

Every built-in entry builds an `nn.Module` whose state-dict keys are identical to the original
implementation's, so a checkpoint people already have loads as-is. Entries are looked up by name;
duplicates and unknown names fail loudly. Two more kinds of names resolve here:

- `timm:<name>`: `timm.create_model(<name>, pretrained=False, num_classes=...)` when timm is installed
  (optional: `pip install adaptd[timm]`). Nothing is ever downloaded: arguments that fetch or read
  weights are refused.
- `module.path:factory`: a user architecture, `factory(num_classes=..., **arch_kwargs)` from an
  importable module. Importing runs code, so the module (or a parent package) must be listed by the
  operator in `ADAPTD_ARCHITECTURE_MODULES` (comma-separated); anything else is refused with
  `architecture_not_allowed` *before* any import.
"""
from __future__ import annotations

import importlib
import os
import re
from typing import Callable

import torch
from torch import nn

from app.contract.architectures import ARCHITECTURES as MANIFEST

from ..errors import AdaptationError

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}
ALLOWLIST_ENV = "ADAPTD_ARCHITECTURE_MODULES"
# timm.create_model arguments that would download weights, read a file or change what the model returns.
TIMM_REFUSED_KWARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                                 "cache_dir", "features_only", "num_classes"})
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def register_architecture(name: str):
    """Registers the torch factory of an entry of the torch-free manifest (app/contract/architectures.py),
    which declares its task, output form and default input; a name missing there fails loudly."""
    if name not in MANIFEST:
        raise ValueError(f"architecture {name!r} has no entry in app/contract/architectures.py")

    def wrap(factory: Callable[..., nn.Module]):
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is registered twice")
        ARCHITECTURES[name] = factory
        return factory

    return wrap


class UnknownArchitecture(KeyError):
    pass


def build_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    return resolve_architecture(name)(num_classes=num_classes, **kwargs)


def resolve_architecture(name: str) -> Callable[..., nn.Module]:
    """The factory behind an architecture name: `factory(num_classes=N, **arch_kwargs) -> nn.Module`.

    Raises UnknownArchitecture for a name that does not exist, AdaptationError for one that may not or
    cannot be used here (`architecture_not_allowed`, `architecture_unavailable`, `invalid_architecture`)."""
    if not isinstance(name, str) or not name:
        raise UnknownArchitecture(f"invalid architecture name {name!r}")
    if name.startswith("timm:"):
        return _timm_factory(name[len("timm:"):])
    if ":" in name:
        return _user_factory(name)
    _ensure_builtins_loaded()
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UnknownArchitecture(
            f"unknown architecture {name!r}; built in: {', '.join(sorted(ARCHITECTURES))}; also "
            "'timm:<name>' (when timm is installed) and allow-listed 'module.path:factory'"
        ) from None


def allowed_architecture_modules() -> list[str]:
    """The operator's allow-list, read from the environment at each call."""
    raw = os.environ.get(ALLOWLIST_ENV, "")
    return [m.strip() for m in raw.split(",") if m.strip() and _DOTTED.match(m.strip())]


def is_allowed_module(module: str, allowed: list[str] | None = None) -> bool:
    """Whether `module` is listed or lies inside a listed package (component-wise: `pkg` allows
    `pkg.models` but not `pkg_evil`)."""
    allowed = allowed_architecture_modules() if allowed is None else allowed
    return any(module == a or module.startswith(a + ".") for a in allowed)


def _user_factory(name: str) -> Callable[..., nn.Module]:
    module_name, _, attr = name.partition(":")
    allowed = allowed_architecture_modules()
    if not (_DOTTED.match(module_name) and _DOTTED.match(attr)) or any(
            part.startswith("__") for part in attr.split(".")):
        raise AdaptationError("architecture_not_allowed",
                              f"{name!r} is not a 'module.path:factory' name (dotted Python identifiers, no "
                              "relative imports, no dunder attributes)", {"architecture": name})
    if not is_allowed_module(module_name, allowed):
        raise AdaptationError(
            "architecture_not_allowed",
            f"module {module_name!r} is not allow-listed for user architectures; the operator lists "
            f"importable packages in {ALLOWLIST_ENV} (comma-separated)",
            {"module": module_name, "allowed_modules": allowed})
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - ImportError, or the module failing while it imports
        raise AdaptationError("architecture_unavailable", f"allow-listed module {module_name!r} cannot be imported "
                              f"on this worker: {type(exc).__name__}: {str(exc)[:300]}",
                              {"module": module_name}) from None
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UnknownArchitecture(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise AdaptationError("invalid_architecture", f"{name!r} is not callable", {"architecture": name})

    def factory(num_classes: int, **kwargs) -> nn.Module:
        model = obj(num_classes=num_classes, **kwargs)
        if not isinstance(model, nn.Module):
            raise AdaptationError("invalid_architecture", f"{name!r} returned {type(model).__name__}, not an "
                                  "nn.Module", {"architecture": name})
        return model

    return factory


def _timm_factory(timm_name: str) -> Callable[..., nn.Module]:
    if not timm_name:
        raise UnknownArchitecture("'timm:' needs a model name, e.g. 'timm:resnet50'")
    try:
        import timm
    except ImportError:
        raise AdaptationError("architecture_unavailable", "timm is not installed on this worker "
                              "(pip install 'adaptd[timm]'); built-in architectures work without it",
                              {"architecture": f"timm:{timm_name}"}) from None
    is_model = getattr(timm, "is_model", None)
    if is_model is not None and not is_model(timm_name):
        raise UnknownArchitecture(f"timm has no model {timm_name!r}")

    def factory(num_classes: int, **kwargs) -> nn.Module:
        refused = sorted(TIMM_REFUSED_KWARGS & set(kwargs))
        if refused:
            raise AdaptationError("invalid_arch_kwargs", f"arch_kwargs {refused} are not accepted for timm models: "
                                  "weights come only from the uploaded checkpoint", {"refused": refused})
        try:
            model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **kwargs)
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise UnknownArchitecture(f"timm has no model {timm_name!r}") from None
            raise
        if not isinstance(model, nn.Module):
            raise AdaptationError("invalid_architecture", f"timm returned {type(model).__name__}")
        return model

    return factory


def classifier_of(model: nn.Module) -> nn.Linear:
    """The final linear layer (SFDA methods freeze it). Built-ins name it via `classifier_name`;
    otherwise the last `nn.Linear` in registration order."""
    name = getattr(model, "classifier_name", None)
    if name:
        return model.get_submodule(name)
    get_classifier = getattr(model, "get_classifier", None)  # timm's convention
    if callable(get_classifier):
        head = get_classifier()
        if isinstance(head, nn.Linear):
            return head
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
    from . import digit_cnn, lenet, resnet, torchvision_det, torchvision_seg, unet, vit, wide_resnet  # noqa: F401
