"""The adaptd metadata of an exported model (safetensors `__metadata__`, strings only): what a
resubmission needs to run it again without flags. Written by the worker, read at submit."""
from __future__ import annotations

import json

from ..version import __version__


def encode(*, architecture: str, num_classes: int, arch_kwargs: dict, preprocess: dict, task: str,
           method: str) -> dict[str, str]:
    return {"architecture": architecture, "num_classes": str(num_classes),
            "arch_kwargs": json.dumps(arch_kwargs, sort_keys=True), "preprocess": json.dumps(preprocess, sort_keys=True),
            "task": task, "method": method, "adaptd_version": __version__}


def decode(meta: dict[str, str]) -> dict:
    """The usable fields of a header's metadata (anything malformed is left out, never trusted)."""
    out: dict = {}
    if isinstance(meta.get("architecture"), str) and meta["architecture"]:
        out["architecture"] = meta["architecture"]
    if str(meta.get("num_classes", "")).isdigit():
        out["num_classes"] = int(meta["num_classes"])
    for key in ("arch_kwargs", "preprocess"):
        try:
            value = json.loads(meta[key])
        except (KeyError, TypeError, ValueError):
            continue
        if isinstance(value, dict):
            out[key] = value
    for key in ("task", "method", "adaptd_version"):
        if isinstance(meta.get(key), str):
            out[key] = meta[key]
    return out
