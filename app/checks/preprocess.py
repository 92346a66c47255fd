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


def resolve(given: dict, from_model: dict | None, architecture: str) -> dict:
    """The complete preprocess: each field from the first layer that has it (`"size": null` given in
    the spec means: keep the input size)."""
    layers = [given, from_model or {}, default_input(architecture) or {}, FALLBACK]
    channels = next(layer["channels"] for layer in layers if layer.get("channels") is not None)
    size = given["size"] if "size" in given else next(layer["size"] for layer in layers[1:] if "size" in layer)
    out = {"channels": channels, "size": size}
    for field in ("mean", "std"):  # the first that fits the channels (one value, or one per channel)
        out[field] = next(list(layer[field]) for layer in layers
                          if layer.get(field) is not None and len(layer[field]) in (1, channels))
    return out
