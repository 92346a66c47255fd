"""Small, fast fixtures for the engine tests: real (briefly trained) source models on scikit-learn's
digits and a shifted target set. Everything on the CPU, one thread."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from app.demo_data import load_sklearn_digits, shift_domain, upscale
from worker.adaptation.data import Preprocess
from worker.adaptation.device import seed_everything
from worker.adaptation.models import build_model
from worker.adaptation.models.export import save_safetensors
from worker.adaptation.training import train_classifier

torch.set_num_threads(1)

PRE = Preprocess(size=16, channels=1, mean=[0.5], std=[0.5])
N_SOURCE, N_TARGET = 700, 128
VIT_KWARGS = dict(image_size=16, patch_size=4, in_channels=1, dim=32, depth=2, heads=2)
CNN_KWARGS = dict(width=8, bottleneck=32)


class GroupNormNet(nn.Module):
    """A small GroupNorm CNN (no BatchNorm): batch size 1 is fine for norm-layer methods."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(16, 16), nn.GroupNorm(2, 16), nn.ReLU())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.features(x)))


class Digits:
    def __init__(self):
        x, y = load_sklearn_digits()
        x = upscale(x, 2)
        order = np.random.default_rng(0).permutation(len(x))
        src, tgt = order[:N_SOURCE], order[N_SOURCE:N_SOURCE + N_TARGET]
        self.x_source, self.y_source = x[src], y[src]
        self.x_target_raw = shift_domain(x[tgt], seed=1)
        self.y_target = torch.from_numpy(y[tgt])
        self.x_target = PRE(torch.from_numpy(self.x_target_raw)[..., None], torch.device("cpu"))

    def train(self, build, epochs: int, lr: float = 3e-3) -> nn.Module:
        seed_everything(0)  # the initialisation too, so every session gets the same model
        return train_classifier(build(), self.x_source, self.y_source, PRE, epochs=epochs, lr=lr, augment_shift=1)


@pytest.fixture(scope="session")
def digits() -> Digits:
    return Digits()


@pytest.fixture(scope="session")
def cnn(digits) -> nn.Module:
    """DigitCNN (BatchNorm2d + BatchNorm1d), width 8."""
    return digits.train(lambda: build_model("digit_cnn", 10, **CNN_KWARGS), epochs=6, lr=5e-3)


@pytest.fixture(scope="session")
def vit(digits) -> nn.Module:
    """A tiny LayerNorm ViT (no BatchNorm)."""
    return digits.train(lambda: build_model("vit_small_digits", 10, **VIT_KWARGS), epochs=12)


@pytest.fixture(scope="session")
def gn_net(digits) -> nn.Module:
    return digits.train(GroupNormNet, epochs=6)


@pytest.fixture(scope="session")
def run_files(digits, cnn, tmp_path_factory):
    """The DigitCNN as safetensors and the shifted target as npz, for `runner.run`."""
    root = tmp_path_factory.mktemp("engine")
    save_safetensors(cnn, root / "model.safetensors")
    np.savez(root / "target.npz", x=digits.x_target_raw[:96], y=digits.y_target.numpy()[:96])
    return root
