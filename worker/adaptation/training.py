"""Supervised training of a source model: used by the demo, the tests and the benchmarks to make the
model a user would upload. Not part of adaptation."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .source_augment import photometric as photometric_augment
from .data.images import ArrayImageSet
from .data.preprocess import Preprocess
from .device import seed_everything


def train_classifier(model: nn.Module, x: np.ndarray, y: np.ndarray, preprocess: Preprocess, epochs: int = 5,
                     batch_size: int = 64, lr: float = 1e-3, seed: int = 0, augment_shift: int = 0,
                     device: str = "cpu", ignore_index: int = -100, photometric: bool = False) -> nn.Module:
    """Adam + cross-entropy, shuffled mini-batches; optional random translation by up to
    `augment_shift` pixels (batched roll) and optional generic photometric augmentation (source_augment.py:
    inversion, colour jitter, blur, noise) for a more robust source model. `y` may hold per-pixel masks
    (train_segmenter), whose `ignore_index` pixels do not count."""
    if augment_shift and y.ndim > 1:
        raise ValueError("augment_shift would move the images but not their masks")
    seed_everything(seed)
    dev = torch.device(device)
    model.to(dev).train()
    data = ArrayImageSet(x, y)
    labels = torch.from_numpy(y.astype(np.int64))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for xb, idx in data.batches(batch_size, rng.permutation(len(data))):
            if len(idx) < 2:
                continue
            xt = preprocess(photometric_augment(xb, rng) if photometric else xb, dev)
            if augment_shift:
                dx, dy = (int(v) for v in rng.integers(-augment_shift, augment_shift + 1, size=2))
                xt = torch.roll(xt, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(xt), labels[idx].to(dev), ignore_index=ignore_index)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def train_segmenter(model: nn.Module, x: np.ndarray, masks: np.ndarray, preprocess: Preprocess, epochs: int = 5,
                    batch_size: int = 32, lr: float = 3e-3, seed: int = 0, device: str = "cpu",
                    photometric: bool = False) -> nn.Module:
    """Adam + per-pixel cross-entropy (mask value 255 ignored), shuffled mini-batches: the classifier's
    loop with masks as the targets (photometric augmentation leaves the masks as they are)."""
    return train_classifier(model, x, masks, preprocess, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                            device=device, ignore_index=255, photometric=photometric)


def train_detector(model: nn.Module, x: np.ndarray, boxes: np.ndarray, labels: np.ndarray, image_index: np.ndarray,
                   epochs: int = 10, batch_size: int = 16, lr: float = 2e-3, seed: int = 0,
                   device: str = "cpu") -> nn.Module:
    """Adam on a torchvision detector's own losses (train mode, one target dict per image; `labels` are
    the model's label ids). The frozen BatchNorm of its backbone is trained live (BatchNorm2d) and frozen
    again after, as a detector is trained before its checkpoint is published. `x`: N×H×W[×3] uint8."""
    from .boxes import targets_per_image
    from .models.torchvision_det import freeze_bn, unfreeze_bn

    seed_everything(seed)
    dev = torch.device(device)
    unfreeze_bn(model)
    for p in model.parameters():
        p.requires_grad_(True)
    model.to(dev).train()
    data = ArrayImageSet(x if x.ndim == 4 else np.repeat(x[..., None], 3, axis=-1))
    targets = targets_per_image({"boxes": boxes, "labels": labels, "image_index": image_index}, len(data))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    steps = epochs * -(-len(data) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for xb, idx in data.batches(batch_size, rng.permutation(len(data))):
            xt = xb.to(dev).permute(0, 3, 1, 2).float().div_(255.0)
            tb = [{k: v.to(dev) for k, v in targets[i].items()} for i in idx.tolist()]
            loss = sum(model(xt, tb).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    freeze_bn(model, only_marked=True)
    return model.eval()
