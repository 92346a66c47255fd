"""SHOT-IM: SHOT with beta = 0 (information maximisation only, no pseudo-labels)."""
from __future__ import annotations

from app.contract.catalog.sfda import ShotIMParams

from .registry import implements
from .shot import Shot


@implements(ShotIMParams)
class ShotIM(Shot):
    beta = 0.0  # `ShotIMParams` has no `beta`: no pseudo-labels are computed
