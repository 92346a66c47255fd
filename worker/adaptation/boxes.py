"""Detection helpers on per-image prediction dicts {"boxes", "scores", "labels"} (tasks/detection.py):
label-free summaries, agreement between two models' detections, pseudo-label filtering and mAP through
torchmetrics' MeanAveragePrecision with the faster_coco_eval backend (COCO's protocol, pycocotools' known
issues fixed). Box geometry (IoU) is torchvision's."""
from __future__ import annotations

import math

import numpy as np
import torch

from .errors import AdaptationError
from .metrics import histogram_entropy


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of a detection's score read as P(object of its class)."""
    p = p.float().clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def confident(pred: dict, threshold: float) -> dict:
    keep = pred["scores"] >= threshold
    return {k: v[keep] for k, v in pred.items()}


def class_histogram(predictions: list[dict], num_classes: int, threshold: float) -> torch.Tensor:
    """Counts of confident detections per label, plus a last bin counting images with none."""
    hist = torch.zeros(num_classes + 1, dtype=torch.long)
    for p in predictions:
        labels = p["labels"][p["scores"] >= threshold]
        if len(labels):
            hist[:num_classes] += torch.bincount(labels.long().clamp(0, num_classes - 1), minlength=num_classes)
        else:
            hist[num_classes] += 1
    return hist


def summary(predictions: list[dict], num_classes: int, threshold: float) -> dict:
    n = max(len(predictions), 1)
    scores = torch.cat([p["scores"] for p in predictions]) if predictions else torch.zeros(0)
    conf = scores[scores >= threshold]
    hist = class_histogram(predictions, num_classes, threshold)
    return {
        "detections_per_image": float(len(conf)) / n,
        "all_detections_per_image": float(len(scores)) / n,
        "mean_score": float(scores.mean()) if len(scores) else 0.0,
        "mean_confident_score": float(conf.mean()) if len(conf) else 0.0,
        "mean_entropy": float(binary_entropy(scores).mean()) if len(scores) else 0.0,
        "images_without_detections": int(hist[num_classes]),
        "predicted_class_counts": hist[:num_classes].tolist(),
        # the collapse signal: labels of confident detections and one "nothing" bin, whose entropy falls
        # when detections vanish or one class takes over
        "predicted_class_entropy": histogram_entropy(hist),
        "predicted_class_entropy_max": math.log(num_classes + 1),
        "score_threshold": threshold,
    }


def match_count(a: dict, b: dict, iou: float = 0.5) -> int:
    """Greedy one-to-one matches of `a`'s boxes (highest score first) to `b`'s boxes of the same label
    with IoU ≥ `iou`."""
    from torchvision.ops import box_iou

    if not len(a["boxes"]) or not len(b["boxes"]):
        return 0
    ious = box_iou(a["boxes"].float(), b["boxes"].float())
    ious[a["labels"][:, None] != b["labels"][None, :]] = 0
    taken = torch.zeros(len(b["boxes"]), dtype=torch.bool)
    found = 0
    for i in torch.argsort(a["scores"], descending=True).tolist():
        row = ious[i].masked_fill(taken, 0)
        j = int(row.argmax())
        if row[j] >= iou:
            taken[j] = True
            found += 1
    return found


def agreement(a: list[dict], b: list[dict], threshold: float, iou: float = 0.5) -> float:
    """How far two models' confident detections agree: matched pairs (same label, IoU ≥ 0.5) over the mean
    number of detections (an F1 between them); 1.0 when neither detects anything."""
    matched = total = 0
    for pa, pb in zip(a, b):
        ca, cb = confident(pa, threshold), confident(pb, threshold)
        matched += match_count(ca, cb, iou)
        total += len(ca["scores"]) + len(cb["scores"])
    return 2 * matched / total if total else 1.0


def targets_per_image(labels: dict, n_images: int) -> list[dict]:
    """The npz ground truth (boxes, labels, image_index arrays) as one target dict per image."""
    boxes = torch.from_numpy(np.asarray(labels["boxes"], np.float32)).reshape(-1, 4)
    cls = torch.from_numpy(np.asarray(labels["labels"], np.int64))
    index = np.asarray(labels["image_index"], np.int64)
    order = np.argsort(index, kind="stable")
    starts = np.searchsorted(index[order], np.arange(n_images + 1))
    return [{"boxes": boxes[order[starts[i]:starts[i + 1]]], "labels": cls[order[starts[i]:starts[i + 1]]]}
            for i in range(n_images)]


def _value(v: torch.Tensor) -> float | None:
    v = float(v)
    return None if v < 0 else v  # COCOeval's -1: nothing to score (no box of that kind)


def mean_average_precision(predictions: list[dict], labels: dict) -> dict:
    """COCO box mAP@[.5:.95], mAP@.5, @.75, AR@100 and AP per class (fractions; None where nothing scores)."""
    from torchmetrics.detection import MeanAveragePrecision

    targets = targets_per_image(labels, len(predictions))
    preds = [{"boxes": p["boxes"], "scores": p["scores"], "labels": p["labels"]} for p in predictions]
    out = _compute(preds, targets, None)
    at50 = _compute(preds, targets, [0.5])  # AP@0.5 per class: COCOeval restricted to that threshold
    classes = [str(int(c)) for c in out["classes"].flatten().tolist()]
    return {
        "map": _value(out["map"]), "map50": _value(out["map_50"]), "map75": _value(out["map_75"]),
        "mar_100": _value(out["mar_100"]),
        "per_class_ap": dict(zip(classes, map(_value, out["map_per_class"].flatten()))),
        "per_class_ap50": dict(zip(classes, map(_value, at50["map_per_class"].flatten()))),
        "num_images": len(predictions), "num_boxes": int(len(labels["labels"])),
        "num_detections": int(sum(len(p["scores"]) for p in predictions)),
    }


def _compute(preds: list[dict], targets: list[dict], iou_thresholds: list[float] | None) -> dict:
    from torchmetrics.detection import MeanAveragePrecision

    try:
        import faster_coco_eval  # noqa: F401  (the backend: a worker extra)
    except ImportError:
        raise AdaptationError("library_unavailable", "scoring boxes needs faster-coco-eval on the worker "
                              "(pip install 'adaptd[worker]')") from None
    metric = MeanAveragePrecision(iou_type="bbox", backend="faster_coco_eval", class_metrics=True,
                                  iou_thresholds=iou_thresholds)
    metric.update(preds, targets)
    return metric.compute()


def filter_pseudo_labels(pred: dict, threshold: float) -> dict:
    """A teacher's detections kept as training targets: score ≥ threshold (boxes, labels)."""
    keep = pred["scores"] >= threshold
    return {"boxes": pred["boxes"][keep].detach(), "labels": pred["labels"][keep].detach()}
