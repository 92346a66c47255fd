"""A job's preprocessing, resolved at submit field by field: what the spec says, else what the uploaded
model's adaptd metadata says (an adapted model resubmitted), else the architecture's default input,
else the input as it is (no resize, 3 channels, mean 0, std 1). The stored spec is complete, so the
worker never guesses."""
from __future__ import annotations

# The architectures' default input (channels, size, mean, std).
# TODO(contract): read app/contract/architectures.py's InputDefaults once it lands on main.
DEFAULT_INPUT: dict[str, dict] = {
    "digit_cnn": {"channels": 1, "size": 32, "mean": [0.5], "std": [0.5]},
    "resnet18": {"channels": 3, "size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "resnet34": {"channels": 3, "size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "resnet50": {"channels": 3, "size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "vit_small_digits": {"channels": 3, "size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    "wrn28_10": {"channels": 3, "size": 32, "mean": [0.4914, 0.4822, 0.4465], "std": [0.2471, 0.2435, 0.2616]},
}
FALLBACK = {"channels": 3, "size": None, "mean": [0.0], "std": [1.0]}


def default_input(architecture: str) -> dict | None:
    return DEFAULT_INPUT.get(architecture)


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
