"""Test-time adaptation methods (online: each batch once, predict then adapt)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from . import CollapseGuardParams, MethodParams, ProtocolParams, describe  # noqa: F401


@describe("tent", "tta", "TENT (Wang et al., ICLR 2021): minimise the mean softmax entropy, updating only "
          "the affine parameters of the norm layers, one step per batch.")
class TentParams(CollapseGuardParams):
    optimizer: Literal["adam", "sgd"] = Field("adam", description="Adam for CIFAR-scale, SGD for ImageNet.")
    lr: float = Field(1e-3, gt=0, description="1e-3 with Adam (CIFAR); 2.5e-4 with SGD (ImageNet, batch 64).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (ignored by Adam).")
    steps: int = Field(1, ge=1, le=10, description="Gradient steps per batch.")
