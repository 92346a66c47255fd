"""`fixed_pseudo_labels`: simple-SFOD's baseline (catalog/detection.py). Before the first epoch the source
detector's frozen BatchNorm statistics are re-estimated on the target (AdaBN) and its detections with
score ≥ threshold on every target image are kept (`prepare`); the model then trains on those fixed labels."""
from __future__ import annotations

from typing import Any

import torch

from app.contract.catalog.detection import FixedPseudoLabelParams

from ._detection import SelfTraining, detect, flip_boxes, flip_images, pseudo_labels
from .registry import implements


@implements(FixedPseudoLabelParams)
class FixedPseudoLabels(SelfTraining):
    def configure(self) -> None:
        super().configure()
        self.labels: dict[int, dict] = {}  # dataset index -> pseudo-label targets (fixed once)

    @torch.no_grad()
    def prepare(self) -> None:
        for x, idx in self.ctx.iterate_target():
            for i, t in zip(idx.tolist(), pseudo_labels(detect(self.model, x, self.ctx.autocast),
                                                      self.params.score_threshold)):
                self.labels[i] = t

    def targets_for(self, x_weak, index, flipped):
        online = detect(self.model, flip_images(x_weak, flipped), self.ctx.autocast)  # the batch as given
        targets = [self.labels[i] for i in index.tolist()]
        return flip_boxes(targets, flipped, x_weak.shape[-1]), online

    def report(self) -> dict[str, Any]:
        kept = [len(t["labels"]) for t in self.labels.values()]
        return {**super().report(), "fixed_pseudo_labels": sum(kept),
                "fixed_pseudo_labels_per_image": sum(kept) / len(kept) if kept else 0.0}

