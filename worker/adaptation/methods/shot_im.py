"""SHOT-IM: SHOT with beta = 0 (information maximisation only, no pseudo-labels)."""
from __future__ import annotations

from app.contract.catalog.sfda import ShotIMParams

from .registry import implements
from .shot import Shot


@implements(ShotIMParams)
class ShotIM(Shot):
    """`ShotIMParams` has no `beta`: `Shot.beta` reads 0, so no pseudo-labels are computed."""
