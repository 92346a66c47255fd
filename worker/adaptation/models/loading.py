"""Checkpoint reading that cannot execute code: safetensors, or `torch.load(weights_only=True)`.

A checkpoint that needs full unpickling is refused (`unsafe_checkpoint`), never loaded another way.
"""
from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import torch
from torch import nn

from ..errors import AdaptationError
from .registry import UnknownArchitecture, build_model, classifier_of

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
STRIP_PREFIXES = ("module.", "_orig_mod.")
TRIM = 20  # list at most this many keys in an error


def detect_model_format(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return "pt"
    raise AdaptationError("unsupported_format", "could not detect the checkpoint format "
                          "(expected safetensors or a torch.save state dict)")


def read_state_dict(path: Path, fmt: str | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Returns the flat state dict and notes on what was unwrapped."""
    fmt = fmt or detect_model_format(path)
    if fmt == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu"), []
        except (SafetensorError, json.JSONDecodeError, OSError, ValueError) as exc:
            raise AdaptationError("invalid_checkpoint", f"not a readable safetensors file: {exc}") from None
    if fmt == "pt":
        return _unwrap(_load_weights_only(path))
    raise AdaptationError("unsupported_format", f"model format {fmt!r} is not supported (safetensors, pt)")


def _load_weights_only(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any global outside the allow-list: a pickled nn.Module, custom classes.
        raise AdaptationError(
            "unsafe_checkpoint",
            "the checkpoint needs full unpickling (it contains Python objects, e.g. a pickled nn.Module), "
            "which could run arbitrary code; save `model.state_dict()` with torch.save, or use safetensors",
            {"reason": str(exc).splitlines()[0][:300]},
        ) from None
    except Exception as exc:  # noqa: BLE001 - corrupt zip, truncated file...
        raise AdaptationError("invalid_checkpoint", f"not a readable torch checkpoint: {exc}") from None


def _unwrap(obj) -> tuple[dict[str, torch.Tensor], list[str]]:
    notes: list[str] = []
    while isinstance(obj, dict) and not _is_tensor_dict(obj):
        key = next((k for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], dict)), None)
        if key is None:
            raise AdaptationError("invalid_checkpoint", "the checkpoint is a dict but neither a state dict nor "
                                  f"a wrapper with one of {WRAPPER_KEYS}", {"keys": sorted(map(str, obj))[:TRIM]})
        notes.append(f"unwrapped '{key}'")
        obj = obj[key]
    if not isinstance(obj, dict):
        raise AdaptationError("invalid_checkpoint", f"expected a state dict, got {type(obj).__name__}")
    for prefix in STRIP_PREFIXES:
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
            notes.append(f"stripped '{prefix}' prefix")
    return obj, notes


def _is_tensor_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def load_model(architecture: str, num_classes: int, arch_kwargs: dict, path: Path,
               fmt: str | None = None) -> tuple[nn.Module, dict]:
    """Build the architecture and load the checkpoint strictly. Returns (model, load report)."""
    try:
        model = build_model(architecture, num_classes, **arch_kwargs)
    except UnknownArchitecture as exc:
        raise AdaptationError("unknown_architecture", str(exc.args[0])) from None
    except TypeError as exc:
        raise AdaptationError("invalid_arch_kwargs", f"arch_kwargs rejected by {architecture}: {exc}") from None
    state, notes = read_state_dict(path, fmt)
    _check_finite(state)
    _check_keys_and_shapes(model, state, num_classes)
    model.load_state_dict(state, strict=True)
    return model, {"architecture": architecture, "tensors": len(state), "notes": notes}


def _check_finite(state: dict[str, torch.Tensor]) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise AdaptationError("nonfinite_weights", f"{len(bad)} tensors contain NaN or Inf",
                              {"tensors": bad[:TRIM]})


def _check_keys_and_shapes(model: nn.Module, state: dict[str, torch.Tensor], num_classes: int) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = {k: {"expected": list(expected[k].shape), "got": list(state[k].shape)}
                  for k in expected if k in state and expected[k].shape != state[k].shape}
    head = classifier_of(model)
    head_key = next((n for n, m in model.named_modules() if m is head), None)
    if head_key and f"{head_key}.weight" in mismatched and len(mismatched) <= 2:
        got = mismatched[f"{head_key}.weight"]["got"][0]
        raise AdaptationError("num_classes_mismatch",
                              f"the checkpoint's classifier has {got} outputs, the spec says num_classes={num_classes}",
                              {"checkpoint_num_classes": got, "num_classes": num_classes})
    if missing or unexpected or mismatched:
        raise AdaptationError(
            "shape_mismatch",
            f"the checkpoint does not match the architecture: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(mismatched)} with another shape",
            {"missing": missing[:TRIM], "unexpected": unexpected[:TRIM],
             "shape_mismatch": dict(list(mismatched.items())[:TRIM])},
        )
