"""The public import name: `from adaptd import Client`.

Installed as the top-level package `adaptd` (pyproject.toml maps this folder); it needs only the base
dependencies (httpx, pydantic), never the server or the worker extras.

    from adaptd import Client
    with Client("http://127.0.0.1:8000") as c:
        job = c.submit(method="tent", model="model.safetensors", architecture="digit_cnn", num_classes=10,
                       data="target.npz")
        job = c.wait(job["id"])
        c.download(job["id"], "model.safetensors", "adapted.safetensors")

        # several source models distilled into one student (DistillNearest / DistillWeighted)
        job = c.submit(method="distill_weighted", models=["mnist.safetensors", "usps.safetensors"],
                       architecture="digit_cnn", num_classes=10, student={"architecture": "digit_cnn",
                       "num_classes": 10}, data="target.npz", labelled_data="few_labels.npz")
        # several methods, one picked without labels
        job = c.submit(method="auto", params={"candidates": ["bn_adapt", "tent", "shot"]}, model=...)
"""
from __future__ import annotations

from app.client import ApiError, Client, Event, build_spec
from app.version import __version__

__all__ = ["ApiError", "Client", "Event", "build_spec", "__version__"]
