"""A job's preprocessing, resolved at submit field by field: what the spec says, else what the uploaded
model's adaptd metadata says (an adapted model resubmitted), else the architecture's default input,
else the input as it is (no resize, 3 channels, mean 0, std 1). The stored spec is complete, so the
worker never guesses."""
from __future__ import annotations

from ..contract.architectures import ARCHITECTURES

FALLBACK = {"channels": 3, "size": None, "mean": [0.0], "std": [1.0]}


def default_input(architecture: str) -> dict | None:
    """The architecture manifest's declared input (app/contract/architectures.py); None for timm and
    user architectures."""
    info = ARCHITECTURES.get(architecture)
    if info is None:
        return None
    i = info.input
    return {"channels": i.channels, "size": i.size, "mean": list(i.mean), "std": list(i.std)}


def resolve(given: dict, from_model: dict | None, architecture: str) -> tuple[dict, dict[str, str]]:
    """(complete preprocess, where each field came from)."""
    layers = [("spec", given), ("model metadata", from_model or {}),
              (f"{architecture} default", default_input(architecture) or {}), ("default", FALLBACK)]
    out, source = {}, {}
    for name, layer in layers:
        if "channels" in layer and layer["channels"] is not None:
            out["channels"], source["channels"] = layer["channels"], name
            break
    for name, layer in layers:  # "size": null in the spec means: keep the input size
        if "size" in layer and (layer["size"] is not None or name == "spec"):
            out["size"], source["size"] = layer["size"], name
            break
    for field in ("mean", "std"):
        for name, layer in layers:
            value = layer.get(field)
            if value is not None and len(value) in (1, out["channels"]):
                out[field], source[field] = list(value), name
                break
    return out, source
