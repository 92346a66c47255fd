"""SHOT-IM: SHOT with beta = 0 (information maximisation only, no pseudo-labels)."""
from __future__ import annotations

from .registry import register_method
from .shot import Shot


@register_method("shot_im")
class ShotIM(Shot):
    """`ShotIMParams` has no `beta`: `Shot.beta` reads 0, so no pseudo-labels are computed."""
