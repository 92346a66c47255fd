"""Generic photometric augmentation for training a source model (training.py's `photometric=True`): what a
practitioner applies by default, built from no target data. Each image is augmented with probability `p`
(default 0.5; the rest pass unchanged), with its own random draw of:
1. inversion with probability 0.5 (AutoAugment's SVHN policy uses Invert);
2. colour jitter: contrast c ~ U(0.5, 1.5) around the image's mean grey, brightness b ~ U(0.6, 1.4), and a
   per-channel gain g ~ U(0.6, 1.4) (a colour cast: grey digits become coloured);
3. Gaussian blur (3×3, σ ~ U(0.3, 1.0)) with probability 0.5;
4. Gaussian noise with σ ~ U(0, 20) grey levels with probability 0.5.
Purely photometric: no pixel moves, so masks stay aligned. uint8 NHWC in, uint8 NHWC out, drawn from a numpy
Generator. Not methods/augment.py's BatchAugment (CoTTA's test-time views): that one also moves pixels (affine,
flip) and has neither inversion nor per-channel gain."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """3×3 Gaussian blur of one C×H×W float image (edges replicated)."""
    k = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / (2 * sigma ** 2))
    k2 = torch.outer(k / k.sum(), k / k.sum()).to(img)
    c = img.shape[0]
    padded = F.pad(img[None], (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, k2.expand(c, 1, 3, 3), groups=c)[0]


def photometric(batch: torch.Tensor, rng: np.random.Generator, p: float = 0.5) -> torch.Tensor:
    """The module's augmentation on a uint8 N×H×W×C batch, drawn from `rng` (same seed, same result)."""
    x = batch.permute(0, 3, 1, 2).float()
    out = x.clone()
    n, c = x.shape[:2]
    for i in range(n):
        if rng.random() >= p:
            continue
        img = x[i]
        if rng.random() < 0.5:
            img = 255.0 - img
        contrast, brightness = rng.uniform(0.5, 1.5), rng.uniform(0.6, 1.4)
        gain = torch.from_numpy(rng.uniform(0.6, 1.4, size=(c, 1, 1))).float()
        img = ((img - img.mean()) * contrast + img.mean()) * brightness * gain
        if rng.random() < 0.5:
            img = _blur(img, rng.uniform(0.3, 1.0))
        if rng.random() < 0.5:
            gen = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
            img = img + torch.randn(img.shape, generator=gen) * rng.uniform(0, 20)
        out[i] = img
    return out.clamp_(0, 255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
