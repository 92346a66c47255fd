"""The source-training photometric augmentation: deterministic under a seed, and photometric only (a
digit stays where its mask says it is), so train_segmenter may use it with unchanged masks."""
from __future__ import annotations

import numpy as np
import torch

from worker.adaptation.source_augment import photometric


def _squares(n: int = 16) -> torch.Tensor:
    """n grey 24×24 images, black with a white 8×8 square at (8..16, 8..16): the square is 'the digit'."""
    x = np.zeros((n, 24, 24, 3), np.uint8)
    x[:, 8:16, 8:16] = 255
    return torch.from_numpy(x)


def test_same_seed_same_images_and_shape():
    x = _squares()
    a = photometric(x, np.random.default_rng(7))
    b = photometric(x, np.random.default_rng(7))
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, b)
    assert not torch.equal(a, photometric(x, np.random.default_rng(8)))
    assert not torch.equal(a, x)
    assert torch.equal(x, _squares())  # the input is left as it was


def test_no_pixel_moves_so_masks_stay_aligned():
    x = _squares(64)
    out = photometric(x, np.random.default_rng(0), p=1.0).float()
    inside = out[:, 9:15, 9:15].mean(dim=(1, 2))  # N×C, away from the blurred edge
    outside = torch.cat([out[:, :6].flatten(1, 2), out[:, 18:].flatten(1, 2)], 1).mean(1)
    # every image, every channel: the square still stands apart from its background where it was drawn
    assert ((inside - outside).abs() > 40).all()
    inverted = inside.mean(1) < outside.mean(1)
    assert 0 < int(inverted.sum()) < len(x)  # inversion happens, not always


def test_about_half_the_images_pass_unchanged():
    x = _squares(64)
    out = photometric(x, np.random.default_rng(0))
    unchanged = (out == x).flatten(1).all(1)
    assert 16 < int(unchanged.sum()) < 48
    assert torch.equal(photometric(x, np.random.default_rng(0), p=0.0), x)
