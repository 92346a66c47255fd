"""Segmentation building blocks: canvases with masks, the small UNet, Bateson's prior loss terms, and the
confusion-matrix scores (checked against hand-computed values)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from app.demo_data import load_sklearn_digits
from worker.adaptation.canvases import IGNORE, NUM_CLASSES, make_canvases, photo_blend, photo_overlay, to_rgb
from worker.adaptation.models.unet import unet_small
from worker.adaptation.segmentation import (confusion, kl_to_prior, scores_from_confusion, soft_proportions,
                                            weighted_entropy)


def test_canvases_carry_their_digits_classes():
    x, y = load_sklearn_digits()
    c = make_canvases(x, y, 50, size=32, digit_size=12, seed=0)
    assert c.x.shape == c.masks.shape == (50, 32, 32)
    for img, m in zip(c.x, c.masks):
        fg = (m != 0) & (m != IGNORE)
        assert fg.any() and (img[fg] >= 128).all() and (img[m == 0] < 32).all()
        assert set(np.unique(m)) <= set(range(NUM_CLASSES)) | {IGNORE}
    # every box holds its digit's class in the mask, and every image has at least one box
    assert set(c.image_index.tolist()) == set(range(50))
    for (x0, y0, x1, y1), label, i in zip(c.boxes.astype(int), c.labels, c.image_index):
        assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
        assert (c.masks[i, y0:y1, x0:x1] == 1 + label).any()


def test_photo_blend_keeps_the_mask_readable():
    x, y = load_sklearn_digits()
    canvases = make_canvases(x, y, 4, size=32, digit_size=12, seed=0).x
    photo = np.random.default_rng(0).integers(0, 255, size=(64, 64, 3), dtype=np.uint8)
    out = photo_blend(canvases, [photo], seed=0)
    assert out.shape == (4, 32, 32, 3) and out.dtype == np.uint8
    assert not np.array_equal(out, to_rgb(canvases))
    over = photo_overlay(canvases, [photo], dim=0.5, seed=0)
    assert over.shape == (4, 32, 32, 3) and over.dtype == np.uint8
    ink, empty = canvases == 255, canvases == 0
    assert (over[ink] == 255).all() and (over[empty] <= 128).all() and over[empty].std() > 10


def test_unet_returns_pixel_logits():
    model = unet_small(NUM_CLASSES)
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 150_000
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, NUM_CLASSES, 32, 32)


def test_soft_proportions_count_confident_pixels_whole():
    probs = torch.zeros(1, 3, 2, 2)
    probs[0, 0, 0, :] = 0.9  # two pixels of class 0
    probs[0, 1, 0, :] = 0.1
    probs[0, 2, 1, :] = 0.6  # two pixels of class 2
    probs[0, 1, 1, :] = 0.4
    est = soft_proportions(probs)
    assert torch.allclose(est.sum(1), torch.ones(1))
    assert est[0, 0] > est[0, 1] and est[0, 2] > est[0, 1]
    # per-pixel max normalisation: class 0 counts 2 whole pixels, class 2 as well
    assert torch.isclose(est[0, 0], est[0, 2])


def test_kl_to_prior_is_zero_at_the_prior_and_punishes_absent_classes():
    est = torch.tensor([[0.7, 0.2, 0.1]])
    assert float(kl_to_prior(est, est)) == pytest.approx(0.0, abs=1e-6)
    absent = torch.tensor([[0.7, 0.3, 0.0]])
    assert float(kl_to_prior(est, absent)) > 1.0


def test_weighted_entropy_weights_classes():
    probs = torch.full((1, 2, 4, 4), 0.5)
    uniform = weighted_entropy(probs, torch.tensor([1.0, 1.0]))
    assert float(uniform) == pytest.approx(np.log(2), rel=1e-4)  # per pixel: −Σ p log p of (½, ½)
    assert float(weighted_entropy(probs, torch.tensor([0.1, 0.9]))) == pytest.approx(float(uniform) / 2, rel=1e-4)


def test_scores_from_confusion_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 1, 0]])
    cm = confusion(pred, target, 3)
    assert int(cm.sum()) == 7  # the ignored pixel is not counted
    s = scores_from_confusion(cm)
    # IoU: class 0: tp 2, gt 3, pred 3 → 2/4; class 1: tp 2, gt 2, pred 3 → 2/3; class 2: tp 1, gt 2, pred 1 → 1/2
    assert s["iou_per_class"] == pytest.approx([0.5, 2 / 3, 0.5])
    assert s["miou"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert s["pixel_accuracy"] == pytest.approx(5 / 7)
    assert s["dice"] == pytest.approx((2 * 2 / 5 + 2 * 1 / 3) / 2)
