"""The embedded demo's data: scikit-learn's bundled 8×8 digits (no download), split into a source
training set and a shifted target set (rescaled, contrast-reduced, noised). numpy only."""
from __future__ import annotations

import numpy as np

# How the demo's model sees its input, shared by the job spec it submits (app/demo.py) and the source
# model it trains (worker/demo_model.py).
PREPROCESS = {"size": 16, "channels": 1, "mean": [0.5], "std": [0.5]}
ARCH_KWARGS = {"width": 16}


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    return x, d.target.astype(np.int64)


def upscale(x: np.ndarray, factor: int) -> np.ndarray:
    return np.kron(x, np.ones((1, factor, factor), dtype=x.dtype))


def shift_domain(x: np.ndarray, seed: int = 0, scale: float = 0.75, contrast: float = 0.7,
                 brightness: float = 40.0, noise: float = 20.0) -> np.ndarray:
    """A new 'scanner': digits drawn smaller (rescaled by `scale`, centred), lower contrast on a
    brighter background, with sensor noise."""
    rng = np.random.default_rng(seed)
    n, h, w = x.shape
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    rows = (np.arange(sh) * h / sh).astype(int)  # nearest-neighbour resampling
    cols = (np.arange(sw) * w / sw).astype(int)
    out = np.zeros((n, h, w), dtype=np.float32)
    top, left = (h - sh) // 2, (w - sw) // 2
    out[:, top:top + sh, left:left + sw] = x[:, rows][:, :, cols]
    out = out * contrast + brightness + rng.normal(0, noise, size=out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def make_demo_split(seed: int = 0, scale: int = 2) -> dict[str, np.ndarray]:
    """Source train (60 %) and shifted target (40 %) from sklearn's digits, upscaled to 16×16."""
    x, y = load_sklearn_digits()
    x = upscale(x, scale)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.6 * len(x))
    src, tgt = order[:cut], order[cut:]
    return {"x_source": x[src], "y_source": y[src], "x_target": shift_domain(x[tgt], seed=seed + 1),
            "y_target": y[tgt]}
