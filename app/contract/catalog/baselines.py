"""Baselines: no gradient updates."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from . import CollapseGuardParams, MethodParams, ProtocolParams, describe  # noqa: F401


@describe("source", "baseline", "Evaluate the uploaded model as is (no adaptation): the baseline.",
          updates="nothing", tasks=("classification", "segmentation", "detection"))
class SourceParams(MethodParams):
    pass


@describe("bn_adapt", "tta", "BN-1 / AdaBN: normalise with target-batch statistics; the exported model "
          "carries BatchNorm statistics re-estimated on the target data. Detectors: their frozen backbone "
          "BatchNorm (FrozenBatchNorm2d) normalises with target-batch statistics while adapting and the export "
          "holds statistics re-estimated on the target, frozen again (same layers and keys; simple-SFOD's "
          "BN-adapted source model).",
          updates="nothing", tasks=("classification", "segmentation", "detection"))
class BNAdaptParams(MethodParams):
    pass


