"""Generates app/checks/architecture_keys.json, the torch-free key manifest the API checks uploads
against (app/checks/manifest.py): each built-in architecture's state-dict keys and shapes at its default
arguments, how each dimension moves with each integer argument (learnt by building the model on the
`meta` device at a few values), and the globals `torch.load(weights_only=True)` allows.

    python -m worker.adaptation.models.key_manifest"""
from __future__ import annotations

import inspect
import json

import torch
import torch._weights_only_unpickler as weights_only

from app.checks import manifest

from .registry import ARCHITECTURES, _ensure_builtins_loaded

STEPS = (1, 2, 3, 4, 6, 8)  # the first step s at which base+s and base+2s both build is used


def generate() -> dict:
    _ensure_builtins_loaded()

    def shapes(factory, kwargs) -> dict[str, list[int]] | None:
        try:
            with torch.device("meta"):
                model = factory(**kwargs)
        except Exception:  # noqa: BLE001 - an argument value this architecture refuses, in whatever way
            return None
        return {k: list(v.shape) for k, v in model.state_dict().items()}

    out = {}
    for name, factory in sorted(ARCHITECTURES.items()):
        declared = inspect.signature(factory).parameters.get("num_classes")
        base_classes = declared.default if declared is not None and isinstance(declared.default, int) else 10
        with torch.device("meta"):
            cls = type(factory(num_classes=base_classes))
        defaults = {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
                    if n not in ("self", "num_classes") and p.default is not inspect.Parameter.empty}
        # What the factory passes on (wrn28_10 fixes depth and widen_factor itself: refused there).
        ref = shapes(factory, {"num_classes": base_classes})
        accepted = {n: v for n, v in defaults.items() if shapes(factory, {"num_classes": base_classes, n: v}) == ref}
        base = {n: v for n, v in accepted.items() if isinstance(v, int) and not isinstance(v, bool)}
        base["num_classes"] = base_classes
        dims = {k: [[v, {}] for v in shape] for k, shape in ref.items()}
        structural, opaque = [], []
        for param in sorted(base):
            for step in STEPS:
                one = shapes(factory, {"num_classes": base_classes, param: base[param] + step})
                two = shapes(factory, {"num_classes": base_classes, param: base[param] + 2 * step})
                if one is not None and two is not None:
                    break
            else:
                opaque.append(param)
                continue
            if set(one) != set(ref) or set(two) != set(ref):
                structural.append(param)
                continue
            for key, shape in ref.items():
                for i, v in enumerate(shape):
                    d1, d2 = one[key][i] - v, two[key][i] - v
                    if d1 or d2:
                        dims[key][i][1][param] = d1 / step if d2 == 2 * d1 else None
        # Our own classes take exactly their __init__'s arguments; a wrapped library factory (torchvision's
        # segmentation models) may take more than its class shows: unknown names are left to the worker.
        closed = cls.__module__.startswith(__package__) and not any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())
        out[name] = {"accepted_kwargs": sorted(set(accepted) | {"num_classes"}), "closed_kwargs": closed, "base": base,
                     "structural": structural, "opaque": opaque,
                     "keys": {k: [v if not deps else [v, deps] for v, deps in d] for k, d in dims.items()}}
    return {"weights_only_globals": sorted(weights_only._get_allowed_globals()), "architectures": out}


def write() -> None:
    manifest.PATH.write_text(json.dumps(generate(), indent=None, sort_keys=True, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    write()
    print(f"wrote {manifest.PATH}")
