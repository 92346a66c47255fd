"""Batched test-time augmentation on the device (CoTTA, RMT, ROID).

The reference implementations (mariodoebler/test-time-adaptation `transforms_cotta.py`, after KATANA)
compose torchvision transforms: clip → colour jitter (brightness, contrast, saturation, hue, gamma) →
edge-pad by half the image size → random affine (±15°, translate 1/16 of the padded size, scale
0.9–1.1, bilinear) → Gaussian blur (kernel 5, σ 0.001–0.5) → centre crop → horizontal flip (p 0.5) →
Gaussian noise (σ 0.005) → clip. Applied to a batch tensor, torchvision draws ONE set of random
parameters per call, for the whole batch; CoTTA calls it 32 times per step.

Here every image of the batch (and every view of it) gets its own random parameters, in a fixed number of
tensor operations whatever the batch size:
- colour ops are per-sample factors broadcast over (C, H, W), in an order drawn once per call (torchvision
  also draws the order once per call); hue is a rotation in YIQ space (a linear 3×3 map per sample, the
  usual GPU approximation of torchvision's HSV hue shift);
- pad + affine + crop + flip is ONE `affine_grid`/`grid_sample` with a per-sample 2×3 matrix:
  `padding_mode="border"` reproduces edge padding exactly for these ranges (the sampled points never leave
  the padded canvas), "reflection" stands in for reflect padding (ROID); the flip is folded into the
  matrix (the blur kernel is symmetric, so flipping before or after it is the same);
- the blur is a separable depthwise convolution with one kernel per (sample, channel) (reflect padding);
- noise is one `randn_like`.

Inputs are the model's normalised tensors; the augmentation works in pixel space [0, 1] (the reference's
space) using the preprocessing's mean/std when known, else each image's own min/max range. Randomness
comes from the global torch RNG of the input's device, which the runner seeds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ITU-R 601 luma (torchvision's rgb_to_grayscale) and the RGB <-> YIQ transform for the hue rotation.
_LUMA = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
_YIQ_TO_RGB = tuple(map(tuple, torch.linalg.inv(torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)).tolist()))


@dataclass(frozen=True)
class AugmentSpec:
    brightness: tuple[float, float] = (0.6, 1.4)
    contrast: tuple[float, float] = (0.7, 1.3)
    saturation: tuple[float, float] = (0.5, 1.5)
    hue: tuple[float, float] = (-0.06, 0.06)       # fraction of a full turn, as torchvision
    gamma: tuple[float, float] = (0.7, 1.3)
    degrees: float = 15.0
    translate: float = 1 / 16                      # fraction of the PADDED size (2× the image), as the reference
    scale: tuple[float, float] = (0.9, 1.1)
    padding: str = "border"                        # grid_sample padding_mode: "border" (edge) or "reflection"
    blur_sigma: tuple[float, float] | None = (0.001, 0.5)
    blur_kernel: int = 5
    hflip: float = 0.5
    noise_std: float = 0.005


# CoTTA and RMT: the full KATANA-style set. ROID: the reference's `cotta_augs=False` variant (reflect
# padding, no blur, no noise).
COTTA_AUGMENT = AugmentSpec()
ROID_AUGMENT = AugmentSpec(padding="reflection", blur_sigma=None, noise_std=0.0)


def _uniform(n: int, bounds: tuple[float, float], device: torch.device) -> torch.Tensor:
    lo, hi = bounds
    return torch.rand(n, device=device) * (hi - lo) + lo


class BatchAugment:
    """`aug(x)` returns a randomly augmented copy of the normalised batch `x` (N, C, H, W): one draw of
    every random parameter per image. `aug.views(x, k)` returns k augmented views of each image, stacked
    view-major ((k·N, C, H, W): view v of image i at v·N + i)."""

    def __init__(self, spec: AugmentSpec = COTTA_AUGMENT, mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None):
        self.spec = spec
        self.mean = None if mean is None else tuple(float(v) for v in mean)
        self.std = None if std is None else tuple(float(v) for v in std)
        # small constants, made once per (device, dtype): creating them from Python lists on a GPU is a
        # blocking host-to-device copy, i.e. a sync, on every call
        self._constants: dict[tuple, torch.Tensor] = {}

    def _const(self, name: str, values, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        key = (name, like.device, like.dtype, shape)
        if key not in self._constants:
            self._constants[key] = torch.tensor(values, dtype=like.dtype).view(shape).to(like.device)
        return self._constants[key]

    def views(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return self(x.repeat(k, 1, 1, 1))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous()
        dtype = x.dtype
        p, restore = self._to_pixels(x.float())
        p = p.clamp(0.0, 1.0)
        p = self._colour(p)
        p = self._geometry(p)
        if self.spec.blur_sigma is not None:
            p = self._blur(p)
        if self.spec.noise_std > 0:
            p = p + torch.randn_like(p) * self.spec.noise_std
        p = p.clamp(0.0, 1.0)
        out = restore(p).to(dtype)
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out.contiguous()

    # --- pixel space -------------------------------------------------------------------------------
    def _to_pixels(self, x: torch.Tensor):
        c = x.shape[1]
        if self.mean is not None and self.std is not None:
            mean = self._const("mean", self.mean, x, (1, len(self.mean), 1, 1)).expand(1, c, 1, 1)
            std = self._const("std", self.std, x, (1, len(self.std), 1, 1)).expand(1, c, 1, 1)
            return x * std + mean, lambda p: (p - mean) / std
        # Unknown normalisation: map each image's own range onto [0, 1] and back.
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        span = (x.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-6)
        return (x - lo) / span, lambda p: p * span + lo

    # --- colour --------------------------------------------------------------------------------------
    def _colour(self, p: torch.Tensor) -> torch.Tensor:
        n, c = p.shape[:2]
        s, dev = self.spec, p.device
        ops = ["brightness", "contrast", "saturation", "hue", "gamma"]
        for i in torch.randperm(len(ops)).tolist():  # one order per call, as torchvision's ColorJitter
            op = ops[i]
            if op == "brightness":
                p = (p * _uniform(n, s.brightness, dev).view(n, 1, 1, 1)).clamp(0, 1)
            elif op == "contrast":
                f = _uniform(n, s.contrast, dev).view(n, 1, 1, 1)
                m = self._gray(p).mean(dim=(1, 2, 3), keepdim=True)
                p = (m + f * (p - m)).clamp(0, 1)
            elif op == "saturation" and c == 3:
                f = _uniform(n, s.saturation, dev).view(n, 1, 1, 1)
                g = self._gray(p)
                p = (g + f * (p - g)).clamp(0, 1)
            elif op == "hue" and c == 3:
                p = self._rotate_hue(p, _uniform(n, s.hue, dev)).clamp(0, 1)
            elif op == "gamma":
                p = p.clamp(1e-8, 1.0).pow(_uniform(n, s.gamma, dev).view(n, 1, 1, 1)).clamp(0, 1)
        return p

    # --- geometry: pad + affine + crop + flip as one grid_sample --------------------------------------
    def _geometry(self, p: torch.Tensor) -> torch.Tensor:
        n, _, h, w = p.shape
        s, dev = self.spec, p.device
        angle = _uniform(n, (-s.degrees, s.degrees), dev) * (math.pi / 180)
        scale = _uniform(n, s.scale, dev)
        # translation of up to translate × padded size (2h, 2w) pixels, in normalised units (2 per image size)
        shift = (torch.rand(n, 2, device=dev) * 2 - 1) * (4 * s.translate)
        flip = torch.rand(n, device=dev) < s.hflip
        cos, sin = torch.cos(angle), torch.sin(angle)
        # Output pixel u (normalised coords) samples input A^-1 (u - t), A = scale · rotation. Angles and
        # shifts are symmetric, so the inverse's parameters are drawn directly. Rotation in pixel space is
        # D^-1 R D in normalised coordinates, D = diag(w, h) / 2.
        inv = 1.0 / scale
        a = torch.stack([torch.stack([cos * inv, -sin * inv * (h / w)], 1),
                         torch.stack([sin * inv * (w / h), cos * inv], 1)], 1)  # (n, 2, 2)
        t = -(a @ shift.unsqueeze(-1))                                         # (n, 2, 1)
        a = a.clone()
        a[:, :, 0] = torch.where(flip.view(n, 1), -a[:, :, 0], a[:, :, 0])    # flip the output's x axis
        theta = torch.cat([a, t], dim=2)
        grid = F.affine_grid(theta, list(p.shape), align_corners=False)
        return F.grid_sample(p, grid, mode="bilinear", padding_mode=s.padding, align_corners=False)

    def _gray(self, p: torch.Tensor) -> torch.Tensor:
        return _gray(p, self._const("luma", _LUMA, p, (1, 3, 1, 1)))

    def _rotate_hue(self, p: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
        return _rotate_hue(p, turns, self._const("to_yiq", _RGB_TO_YIQ, p, (3, 3)),
                           self._const("from_yiq", _YIQ_TO_RGB, p, (3, 3)))

    # --- blur: per-(sample, channel) separable Gaussian -------------------------------------------------
    def _blur(self, p: torch.Tensor) -> torch.Tensor:
        n, c, h, w = p.shape
        k = self.spec.blur_kernel
        sigma = _uniform(n, self.spec.blur_sigma, p.device).view(n, 1)
        r = torch.arange(k, device=p.device, dtype=p.dtype) - (k - 1) / 2
        kern = torch.exp(-0.5 * (r.view(1, k) / sigma) ** 2)
        kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (n·c, k)
        pad = k // 2
        if min(h, w) <= pad:  # reflect padding needs a larger image
            return p
        y = F.pad(p.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
        y = F.conv2d(y, kern.view(n * c, 1, 1, k), groups=n * c)
        y = F.conv2d(y, kern.view(n * c, 1, k, 1), groups=n * c)
        return y.view(n, c, h, w)


def _gray(p: torch.Tensor, luma: torch.Tensor) -> torch.Tensor:
    if p.shape[1] != 3:
        return p.mean(1, keepdim=True)
    return (p * luma).sum(1, keepdim=True)


def _rotate_hue(p: torch.Tensor, turns: torch.Tensor, to_yiq: torch.Tensor, from_yiq: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma plane of YIQ by `turns` × 2π per sample: one (3×3) linear map per image."""
    n = p.shape[0]
    ang = turns * (2 * math.pi)
    cos, sin = torch.cos(ang), torch.sin(ang)
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rot = torch.stack([torch.stack([one, zero, zero], 1),
                       torch.stack([zero, cos, -sin], 1),
                       torch.stack([zero, sin, cos], 1)], 1)  # (n, 3, 3)
    full = from_yiq @ rot @ to_yiq
    return torch.einsum("nij,njhw->nihw", full, p)
