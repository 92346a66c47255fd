"""Pure metric functions over probability tensors (N×C, float) and labels (N,): the classification
task's metrics (`tasks/classification.py`; stable top-level keys in docs/ARCHITECTURE.md §4)."""
from __future__ import annotations

import math

import torch


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(1) == labels).float().mean())


def per_class_accuracy(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    pred = probs.argmax(1)
    out: list[float | None] = []
    for c in range(num_classes):
        mask = labels == c
        out.append(float((pred[mask] == c).float().mean()) if mask.any() else None)
    return out


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += float(mask.float().mean()) * abs(float(conf[mask].mean()) - float(correct[mask].mean()))
    return ece


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-sample Shannon entropy in nats."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(1)


def mean_entropy(probs: torch.Tensor) -> float:
    return float(entropy(probs).mean())


def mean_max_probability(probs: torch.Tensor) -> float:
    return float(probs.max(1).values.mean())


def class_histogram(predictions: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(predictions, minlength=num_classes)[:num_classes].tolist()


def histogram_entropy(histogram: list[int] | torch.Tensor) -> float:
    """Entropy (nats) of the predicted-class distribution: ln(C) when balanced, 0 when collapsed."""
    h = torch.as_tensor(histogram, dtype=torch.float64)
    if h.sum() == 0:
        return 0.0
    p = h / h.sum()
    return float(-(p[p > 0] * p[p > 0].log()).sum())


def agreement(probs_a: torch.Tensor, probs_b: torch.Tensor) -> float:
    return float((probs_a.argmax(1) == probs_b.argmax(1)).float().mean())


def prediction_summary(probs: torch.Tensor, num_classes: int) -> dict:
    """Label-free summary of a model's predictions on a set."""
    hist = class_histogram(probs.argmax(1), num_classes)
    return {
        "mean_entropy": mean_entropy(probs),
        "mean_max_probability": mean_max_probability(probs),
        "predicted_class_histogram": hist,
        "predicted_class_entropy": histogram_entropy(hist),
        "predicted_class_entropy_max": math.log(num_classes),
    }


def labelled_summary(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    acc = accuracy(probs, labels)
    return {
        "accuracy": acc,
        "error": 1.0 - acc,
        "per_class_accuracy": per_class_accuracy(probs, labels, num_classes),
        "ece": expected_calibration_error(probs, labels),
    }
