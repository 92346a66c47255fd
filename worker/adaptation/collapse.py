"""Collapse guard: watches a histogram of the predictions over a sliding window of recent batches (the task
makes it: predicted classes; for masks, per class the images that hold it) and the loss; on collapse,
restores the last healthy state: collapse under long continual runs and high learning rates (all classes
predicted as one) is the failure users of TTA hit most."""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch

from .metrics import histogram_entropy

MAX_ROLLBACKS = 3


@dataclass
class CollapseGuard:
    num_classes: int
    ratio: float                      # collapse when window entropy < ratio * ln(C) ...
    source_entropy: float             # ... and < half the source model's histogram entropy on the target
    window_batches: int = 8
    enabled: bool = True
    events: list[dict] = field(default_factory=list)
    _window: deque = field(default_factory=deque)
    healthy_state: dict | None = None

    @property
    def threshold(self) -> float:
        return min(self.ratio * math.log(self.num_classes), 0.5 * self.source_entropy)

    def observe(self, counts: torch.Tensor) -> None:
        """One step's histogram (TaskEngine.collapse_counts: num_classes bins)."""
        self._window.append(counts)
        while len(self._window) > self.window_batches:
            self._window.popleft()

    def window_entropy(self) -> float:
        return histogram_entropy(torch.stack(list(self._window)).sum(0).cpu()) if self._window else math.log(self.num_classes)

    def check(self, losses: list[float]) -> str | None:
        """Returns the reason for a collapse, or None when healthy."""
        if not self.enabled:
            return None
        if any(not math.isfinite(v) for v in losses):
            return "loss_not_finite"
        if len(self._window) >= min(self.window_batches, 4) and self.window_entropy() < self.threshold:
            return "predicted_class_histogram_collapsed"
        return None

    def record(self, step: int, reason: str) -> None:
        self.events.append({"step": step, "reason": reason, "window_entropy": self.window_entropy(),
                            "threshold": self.threshold, "action": "rolled_back"})
        self._window.clear()

    @property
    def exhausted(self) -> bool:
        return len(self.events) >= MAX_ROLLBACKS
