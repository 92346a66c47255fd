"""Checkpoint reading that cannot execute code: safetensors, or `torch.load(weights_only=True)`.

A checkpoint that needs full unpickling is refused (`unsafe_checkpoint`), never loaded another way
(an explicit `weights_only=True` is not overridden by `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`). Pickles in
old protocols and TorchScript archives are refused before any unpickling.

Order of work in `load_model`: resolve the architecture name (unknown or not allow-listed names fail
before the checkpoint is read), read the tensors, check them (layout, device, finiteness), build the
architecture on the `meta` device (no memory) and compare keys, shapes and dtypes, and only then
build the real model and load it strictly. So `arch_kwargs` cannot make the worker allocate a model
larger than the uploaded checkpoint, and a mismatch is reported with trimmed key lists.
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from app.checks.checkpoints import WRAPPER_KEYS, align_keys, sniff_format

from ..errors import AdaptationError
from .registry import UnknownArchitecture, classifier_of, resolve_architecture

MODEL_FORMATS = ("safetensors", "pt")
TRIM = 20  # list at most this many keys in an error


# --- reading ----------------------------------------------------------------------------------------

def detect_model_format(path: Path) -> str:
    fmt = _sniff_model_format(path)
    if fmt is None:
        raise AdaptationError("unsupported_format", "could not detect the checkpoint format "
                              "(expected safetensors or a torch.save state dict)")
    return fmt


def _sniff_model_format(path: Path) -> str | None:
    with open(path, "rb") as f:
        return sniff_format(f.read(16))  # the API sniffs uploads the same way at submit


def read_state_dict(path: Path, fmt: str | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Returns the flat state dict and notes on what was unwrapped."""
    if fmt is not None and fmt not in MODEL_FORMATS:
        raise AdaptationError("unsupported_format", f"model format {fmt!r} is not supported (safetensors, pt)")
    detected = _sniff_model_format(path)
    if detected is None:
        raise AdaptationError("unsupported_format", "could not detect the checkpoint format "
                              "(expected safetensors or a torch.save state dict)"
                              + (f"; the file was declared {fmt!r}" if fmt else ""))
    if fmt is not None and fmt != detected:
        raise AdaptationError("format_mismatch", f"the checkpoint was declared {fmt!r} but is {detected!r}",
                              {"declared": fmt, "detected": detected})
    if detected == "safetensors":
        return _read_safetensors(path), []
    return _unwrap(_load_weights_only(path))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, json.JSONDecodeError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise AdaptationError("invalid_checkpoint", f"not a readable safetensors file: {exc}") from None


def _looks_like_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _load_weights_only(path: Path):
    if _looks_like_torchscript(path):
        raise AdaptationError("unsupported_format", "TorchScript archives are not accepted (loading one runs "
                              "its code); upload `model.state_dict()` saved with torch.save, or safetensors")
    try:
        # weights_only=True, explicitly: the allow-listed unpickler (tensors, containers, primitives).
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any global outside the allow-list: a pickled nn.Module, custom classes,
        # os.system and friends. Nothing was executed.
        detail = _unpickler_detail(str(exc))
        raise AdaptationError(
            "unsafe_checkpoint",
            "the checkpoint needs full unpickling (it contains Python objects, e.g. a pickled nn.Module), "
            "which could run arbitrary code; save `model.state_dict()` with torch.save, or use safetensors",
            detail,
        ) from None
    except Exception as exc:  # noqa: BLE001 - corrupt zip, truncated file...
        if "TorchScript" in str(exc):
            raise AdaptationError("unsupported_format", "TorchScript archives are not accepted; upload "
                                  "`model.state_dict()` saved with torch.save, or safetensors") from None
        raise AdaptationError("invalid_checkpoint", f"not a readable torch checkpoint: {_first_line(str(exc))}"
                              ) from None


def _unpickler_detail(text: str) -> dict:
    """The useful part of torch's weights_only error (its advice to retry with weights_only=False is
    exactly what must not be done with an upload, so it is not passed on)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    line = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln or "WeightsUnpickler error" in ln), None)
    if line:
        line = line.replace("WeightsUnpickler error: ", "").split(" Please use")[0]
    detail = {"reason": (line or "an object outside the weights-only allow-list")[:300]}
    name = re.search(r"GLOBAL ([\w.]+)", text)
    if name:
        detail["global"] = name.group(1)
    return detail


def _first_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return (lines[0] if lines else text)[:300]


def _unwrap(obj) -> tuple[dict[str, torch.Tensor], list[str]]:
    notes: list[str] = []
    while isinstance(obj, dict) and not _is_tensor_dict(obj):
        key = next((k for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], dict)), None)
        if key is None:
            non_tensor = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
            raise AdaptationError("invalid_checkpoint", "the checkpoint is a dict but neither a state dict (string "
                                  f"keys, tensor values) nor a wrapper with one of {WRAPPER_KEYS}",
                                  {"keys": sorted(map(str, obj))[:TRIM], "non_tensor_keys": non_tensor[:TRIM]})
        notes.append(f"unwrapped '{key}'")
        obj = obj[key]
    if not isinstance(obj, dict):
        raise AdaptationError("invalid_checkpoint", f"expected a state dict, got {type(obj).__name__}")
    return obj, notes


def _is_tensor_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


# --- loading ----------------------------------------------------------------------------------------

def load_model(architecture: str, num_classes: int, arch_kwargs: dict, path: Path,
               fmt: str | None = None) -> tuple[nn.Module, dict]:
    """Build the architecture and load the checkpoint strictly. Returns (model, load report)."""
    if not isinstance(arch_kwargs, dict) or not all(isinstance(k, str) for k in arch_kwargs):
        raise AdaptationError("invalid_arch_kwargs", "arch_kwargs must be an object with string keys")
    try:
        factory = resolve_architecture(architecture)
    except UnknownArchitecture as exc:
        raise AdaptationError("unknown_architecture", str(exc.args[0]), {"architecture": architecture}) from None
    state, notes = read_state_dict(path, fmt)
    _check_tensors(state)
    skeleton = _build(factory, architecture, num_classes, arch_kwargs, meta=True)
    model = None
    if skeleton is None:  # the factory cannot build on the meta device: build it for real
        model = skeleton = _build(factory, architecture, num_classes, arch_kwargs, meta=False)
    expected = skeleton.state_dict()
    state = _align_keys(expected, state, notes)
    _check_keys_and_shapes(skeleton, expected, state, num_classes)
    _check_dtypes(expected, state)
    if model is None:
        model = _build(factory, architecture, num_classes, arch_kwargs, meta=False)
    model.load_state_dict(state, strict=True)
    return model, {"architecture": architecture, "format": fmt or detect_model_format(path),
                   "tensors": len(state), "notes": notes}


def _build(factory, architecture: str, num_classes: int, arch_kwargs: dict, meta: bool) -> nn.Module | None:
    try:
        if meta:
            with torch.device("meta"):
                return factory(num_classes=num_classes, **arch_kwargs)
        return factory(num_classes=num_classes, **arch_kwargs)
    except AdaptationError:
        raise
    except UnknownArchitecture as exc:
        raise AdaptationError("unknown_architecture", str(exc.args[0]), {"architecture": architecture}) from None
    except (TypeError, ValueError) as exc:
        raise AdaptationError("invalid_arch_kwargs", f"arch_kwargs rejected by {architecture}: {exc}",
                              {"arch_kwargs": sorted(arch_kwargs)}) from None
    except Exception as exc:  # noqa: BLE001 - a user/timm factory failing in its own way
        if meta:
            return None
        raise AdaptationError("architecture_build_failed", f"building {architecture} failed: "
                              f"{type(exc).__name__}: {_first_line(str(exc))}") from None


MAX_ABS_WEIGHT = 1e15  # trained networks stay far below; beyond it float32 activations overflow


def _check_tensors(state: dict[str, torch.Tensor]) -> None:
    odd = [k for k, v in state.items()
           if v.layout != torch.strided or v.is_quantized or v.is_nested or v.device.type != "cpu"]
    if odd:
        raise AdaptationError("invalid_checkpoint", f"{len(odd)} tensors are sparse, quantized, nested or not "
                              "on the CPU; a state dict of dense tensors is expected", {"tensors": odd[:TRIM]})
    bad = [k for k, v in state.items() if (v.is_floating_point() or v.is_complex()) and not torch.isfinite(v).all()]
    if bad:
        raise AdaptationError("nonfinite_weights", f"{len(bad)} tensors contain NaN or Inf",
                              {"tensors": bad[:TRIM]})
    huge = [k for k, v in state.items() if v.is_floating_point() and v.numel() and v.abs().max() > MAX_ABS_WEIGHT]
    if huge:
        raise AdaptationError("nonfinite_weights", f"{len(huge)} tensors hold values beyond ±{MAX_ABS_WEIGHT:g}: "
                              "they overflow in the first layers", {"tensors": huge[:TRIM]})
    negative = [k for k, v in state.items() if k.endswith("running_var") and v.is_floating_point()
                and v.numel() and v.min() < 0]
    if negative:
        raise AdaptationError("invalid_checkpoint", f"{len(negative)} BatchNorm running variances are negative",
                              {"tensors": negative[:TRIM]})


def _align_keys(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                notes: list[str]) -> dict[str, torch.Tensor]:
    """Harmless key differences tolerated (app/checks/checkpoints.py: the submit check uses the same)."""
    rename, absent_nbt, more = align_keys(set(expected), list(state))
    notes += more
    state = {rename[k]: v for k, v in state.items() if k in rename}
    for k in absent_nbt:
        state[k] = torch.tensor(0, dtype=torch.long)
    return state


def _check_keys_and_shapes(model: nn.Module, expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                           num_classes: int) -> None:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = {k: {"expected": list(expected[k].shape), "got": list(state[k].shape)}
                  for k in expected if k in state and expected[k].shape != state[k].shape}
    try:
        head = classifier_of(model)
    except ValueError:
        head = None
    head_key = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    if (head_key and f"{head_key}.weight" in mismatched and len(mismatched) <= 2 and not missing
            and not unexpected and all(k.startswith(f"{head_key}.") for k in mismatched)):
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
             "shape_mismatch": dict(list(mismatched.items())[:TRIM]),
             "counts": {"missing": len(missing), "unexpected": len(unexpected), "shape_mismatch": len(mismatched)}},
        )


def _check_dtypes(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Floating weights must come as floating tensors (fp16/bf16/fp64 are cast); integer or complex data
    in their place would be cast silently into nonsense."""
    bad = {k: {"expected": str(expected[k].dtype), "got": str(state[k].dtype)} for k in expected
           if expected[k].is_floating_point() and (not state[k].is_floating_point() or state[k].is_complex())}
    if bad:
        raise AdaptationError("dtype_mismatch", f"{len(bad)} tensors have a non-floating dtype where the architecture "
                              "has floating weights", {"tensors": dict(list(bad.items())[:TRIM])})
