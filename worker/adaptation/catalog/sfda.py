"""Source-free domain adaptation methods (several epochs over the target set)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from . import CollapseGuardParams, MethodParams, ProtocolParams, describe  # noqa: F401


