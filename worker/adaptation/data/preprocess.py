"""Batched preprocessing on the device: uint8 NHWC -> float NCHW, resized, channel-matched, normalised."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Preprocess:
    # The job's `preprocess` (app/contract/jobs.py PreprocessSpec declares the defaults).
    size: int | None                 # square output size; None keeps the input size
    channels: int
    mean: list[float]
    std: list[float]

    def __call__(self, batch: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
        x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        x = self._match_channels(x)
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.size)
        mean = torch.tensor(self.mean, device=device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device, dtype=x.dtype).view(1, -1, 1, 1)
        x = (x - mean) / std
        if channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        # With one channel the NHWC permute leaves strides that `contiguous()` accepts but CPU kernels read
        # as channels_last (torch 2.13's GroupNorm backward segfaults on them): make them the standard ones.
        return x.clone(memory_format=torch.contiguous_format) if x.stride() != _strides(x.shape) else x

    def _match_channels(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c == 4:  # RGBA: drop alpha (composited on black would change the image)
            x, c = x[:, :3], 3
        if c == self.channels:
            return x
        if c == 1 and self.channels == 3:
            return x.expand(-1, 3, -1, -1)
        if c == 3 and self.channels == 1:  # ITU-R 601 luma
            w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            return (x * w).sum(1, keepdim=True)
        raise ValueError(f"cannot convert {c} channels to {self.channels}")


def _strides(shape: torch.Size) -> tuple[int, ...]:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= n
    return tuple(reversed(out))
