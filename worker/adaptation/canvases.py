"""Digit canvases for segmentation and detection: 1-3 real digits pasted on a blank canvas with their
per-pixel masks (0 = background, 1 + d = digit d, 255 = ignore) and boxes, and the real shifts the benchmarks
and the tests adapt to. numpy only; used by the tests, the benchmarks and nothing in a job's path."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = 255
NUM_CLASSES = 11  # background + 10 digits


def resize_nearest(x: np.ndarray, size: int) -> np.ndarray:
    """N×h×w → N×size×size by nearest-neighbour index maps (no interpolation library needed)."""
    _, h, w = x.shape
    rows = (np.arange(size) * h / size).astype(int)
    cols = (np.arange(size) * w / size).astype(int)
    return x[:, rows][:, :, cols]


def resize_bilinear(x: np.ndarray, size: int) -> np.ndarray:
    """N×h×w uint8 → N×size×size, bilinear with half-pixel centres (smooth strokes for upscaled USPS)."""
    _, h, w = x.shape
    def coords(n_out, n_in):
        c = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        c = np.clip(c, 0, n_in - 1)
        lo = np.floor(c).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (c - lo).astype(np.float32)
    r0, r1, fr = coords(size, h)
    c0, c1, fc = coords(size, w)
    xf = x.astype(np.float32)
    top = xf[:, r0][:, :, c0] * (1 - fc) + xf[:, r0][:, :, c1] * fc
    bot = xf[:, r1][:, :, c0] * (1 - fc) + xf[:, r1][:, :, c1] * fc
    out = top * (1 - fr)[None, :, None] + bot * fr[None, :, None]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


@dataclass
class Canvases:
    """x: N×H×W uint8; masks: N×H×W uint8; boxes (M×4 float32 xyxy around each digit's strokes), labels
    (M int64, the digit 0..9) and image_index (M int64): the npz box format of the detection task."""

    x: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    image_index: np.ndarray


def make_canvases(digits: np.ndarray, labels: np.ndarray, n: int, size: int = 48, digit_size: int = 20,
                  max_digits: int = 3, ink: int = 128, seed: int = 0) -> Canvases:
    """`n` grey canvases of `size`² with 1..`max_digits` non-overlapping digits of `digit_size`² drawn from
    `digits` (N×h×w uint8, white ink on black), their masks — pixels with ink ≥ `ink` get the digit's class
    (1 + label), faint stroke edges (ink in [ink/4, ink)) are ignored (255), the rest is background (0) —
    and one box per digit around its strokes."""
    rng = np.random.default_rng(seed)
    tiles = digits if digits.shape[1] == digit_size else resize_bilinear(digits, digit_size)
    x = np.zeros((n, size, size), np.uint8)
    y = np.zeros((n, size, size), np.uint8)
    boxes: list[tuple[float, float, float, float]] = []
    box_labels: list[int] = []
    box_image: list[int] = []
    for i in range(n):
        taken: list[tuple[int, int]] = []
        for _ in range(int(rng.integers(1, max_digits + 1))):
            for _try in range(20):  # rejection sampling for a free spot
                top, left = (int(v) for v in rng.integers(0, size - digit_size + 1, size=2))
                if all(abs(top - t) >= digit_size or abs(left - l) >= digit_size for t, l in taken):
                    break
            else:
                continue
            taken.append((top, left))
            k = int(rng.integers(len(tiles)))
            tile = tiles[k]
            region = (slice(top, top + digit_size), slice(left, left + digit_size))
            x[i][region] = np.maximum(x[i][region], tile)
            cls = np.where(tile >= ink, 1 + int(labels[k]), np.where(tile >= ink // 4, IGNORE, 0))
            y[i][region] = np.where(cls != 0, cls, y[i][region]).astype(np.uint8)
            rows, cols = np.nonzero(tile >= ink // 4)
            if len(rows):
                boxes.append((left + cols.min(), top + rows.min(), left + cols.max() + 1, top + rows.max() + 1))
                box_labels.append(int(labels[k]))
                box_image.append(i)
    return Canvases(x, y, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(box_labels, np.int64),
                    np.asarray(box_image, np.int64))


def to_rgb(x: np.ndarray) -> np.ndarray:
    return np.repeat(x[..., None], 3, axis=-1)


def _photo_patches(photos: list[np.ndarray], n: int, h: int, w: int, seed: int):
    """n random h×w RGB crops (int16) of the photographs (grey photos repeated over channels)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        if photo.ndim == 2:
            photo = np.repeat(photo[..., None], 3, axis=-1)
        photo = photo[..., :3]
        top = int(rng.integers(0, photo.shape[0] - h + 1))
        left = int(rng.integers(0, photo.shape[1] - w + 1))
        yield photo[top:top + h, left:left + w].astype(np.int16)


def photo_blend(x: np.ndarray, photos: list[np.ndarray], seed: int = 0) -> np.ndarray:
    """MNIST-M's recipe on canvases: |photo patch − digit| per channel, the patch a random crop of a real
    colour photograph. N×H×W grey → N×H×W×3."""
    out = np.empty((*x.shape, 3), np.uint8)
    for i, patch in enumerate(_photo_patches(photos, *x.shape, seed)):
        out[i] = np.abs(patch - x[i][..., None].astype(np.int16)).astype(np.uint8)
    return out


def photo_overlay(x: np.ndarray, photos: list[np.ndarray], dim: float = 0.5, seed: int = 0) -> np.ndarray:
    """White digits over a real photograph dimmed to `dim` of its brightness (the brighter of the two per
    pixel): the background is a real scene, the ink stays ink. N×H×W grey → N×H×W×3."""
    out = np.empty((*x.shape, 3), np.uint8)
    for i, patch in enumerate(_photo_patches(photos, *x.shape, seed)):
        out[i] = np.maximum(dim * patch, x[i][..., None]).clip(0, 255).astype(np.uint8)
    return out


def skimage_photos() -> list[np.ndarray]:
    """Real colour photographs bundled in scikit-image's wheel (no download)."""
    from skimage import data

    return [getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
                                                "immunohistochemistry", "cat")]


def noise_contrast(x: np.ndarray, seed: int = 0, contrast: float = 0.5, brightness: float = 60.0,
                   sigma: float = 25.0) -> np.ndarray:
    """A sensor shift: lower contrast on a brighter background with Gaussian noise (RGB in, RGB out)."""
    rng = np.random.default_rng(seed)
    out = x.astype(np.float32) * contrast + brightness + rng.normal(0, sigma, size=x.shape)
    return np.clip(out, 0, 255).astype(np.uint8)
