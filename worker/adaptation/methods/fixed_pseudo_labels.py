"""`fixed_pseudo_labels`: simple-SFOD's baseline (catalog/detection.py). Before the first epoch the source
detector's frozen BatchNorm statistics are re-estimated on the target (AdaBN) and its detections with
score ≥ threshold on every target image are kept; the model then trains on those fixed labels."""
from __future__ import annotations

from typing import Any

import torch

from app.contract.catalog.detection import FixedPseudoLabelParams

from ..models.export import recalibrate_batch_norm
from ..models.torchvision_det import freeze_bn, unfreeze_bn
from ._detection import SelfTraining, detect, flip_boxes, flip_images, pseudo_labels
from .registry import implements


@implements(FixedPseudoLabelParams)
class FixedPseudoLabels(SelfTraining):
    def configure(self) -> None:
        super().configure()
        self.labels: dict[int, dict] | None = None  # dataset index -> pseudo-label targets (fixed once)
        self.bn_batches = 0

    @torch.no_grad()
    def begin_epoch(self, epoch: int) -> None:
        if self.labels is not None:
            return
        if self.params.adapt_batch_norm:
            # AdaBN of the frozen statistics (and of live BatchNorm layers, SSDlite's), frozen again after.
            unfreeze_bn(self.model)
            self.bn_batches = recalibrate_batch_norm(self.model, (x for x, _ in self.ctx.iterate_target()),
                                                     self.ctx.autocast)
            freeze_bn(self.model, only_marked=True)
            # the optimizer holds the parameters, not the layers: FrozenBatchNorm2d has none, nothing changes
        self.labels = {}
        for x, idx in self.ctx.iterate_target():
            for i, t in zip(idx.tolist(), pseudo_labels(detect(self.model, x, self.ctx.autocast),
                                                      self.params.score_threshold)):
                self.labels[i] = t

    def targets_for(self, x_weak, index, flipped):
        online = detect(self.model, flip_images(x_weak, flipped), self.ctx.autocast)  # the batch as given
        targets = [self.labels[i] for i in index.tolist()]
        return flip_boxes(targets, flipped, x_weak.shape[-1]), online

    def report(self) -> dict[str, Any]:
        kept = [len(t["labels"]) for t in (self.labels or {}).values()]
        return {**super().report(), "batchnorm_adapted_batches": self.bn_batches,
                "fixed_pseudo_labels": sum(kept),
                "fixed_pseudo_labels_per_image": sum(kept) / len(kept) if kept else 0.0}

