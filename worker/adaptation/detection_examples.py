"""A few detection examples for people to look at (the dashboard draws the boxes over the thumbnails): each
image as a small PNG data URL with its detections before and after adaptation, and its ground-truth boxes
when the set is labelled, every box in the thumbnail's pixels. Images whose detections changed most come
first (detections of the source model and of the adapted one that find no partner of the same label at
IoU ≥ 0.5, counted over detections scoring at least the task's threshold); the rest are spread over the
set. Stored in `examples.json` (at most ~BUDGET_BYTES per job)."""
from __future__ import annotations

import json

import numpy as np
import torch

from .boxes import confident, match_count, targets_per_image
from .examples import choose, thumbnail

COUNT = 6
THUMBNAIL_PX = 160    # the longer side: boxes must stay legible
MAX_BOXES = 30        # per image and per model, the highest-scoring ones
BUDGET_BYTES = 160_000  # the whole gallery: items past it are left out (a 160 px photo is ~40 kB of PNG)


def changed_detections(before: list[dict], after: list[dict], threshold: float) -> np.ndarray:
    """Per image: the confident detections of either model that the other has no match for."""
    out = np.zeros(len(before), np.int64)
    for i, (b, a) in enumerate(zip(before, after)):
        cb, ca = confident(b, threshold), confident(a, threshold)
        out[i] = len(cb["scores"]) + len(ca["scores"]) - 2 * match_count(ca, cb)
    return out


def pick(data, before: list[dict], after: list[dict], labelled: bool, threshold: float,
         count: int = COUNT) -> dict:
    """`before`/`after`: per-image prediction dicts {boxes, scores, labels} of the source and the adapted
    model over `data`, in stored order, in the coordinates of the images `data` yields."""
    n = len(data)
    changed = changed_detections(before, after, threshold)
    chosen = choose(changed, count)
    images, _ = next(iter(data.batches(len(chosen), np.asarray(chosen, dtype=np.int64))))
    truth = targets_per_image(data.labels, n) if labelled else None
    items, spent = [], 0
    sizes = data.image_sizes
    for k, i in enumerate(chosen):
        h, w = (int(v) for v in sizes[i])
        hwc = images[k].numpy()[:h, :w]  # without the padding of an archive of several sizes
        url, (tw, th) = thumbnail(hwc, THUMBNAIL_PX)
        scale = (tw / w, th / h)
        item = {"index": i, "image": url, "width": tw, "height": th, "changed": int(changed[i]),
                "before": _boxes(before[i], scale, threshold), "after": _boxes(after[i], scale, threshold),
                "truth": _boxes(truth[i], scale) if truth is not None else None}
        spent += len(json.dumps(item))
        if items and spent > BUDGET_BYTES:
            break
        items.append(item)
    return {"task": "detection", "set": "eval" if labelled else "target",
            "class_names": getattr(data, "class_names", None), "score_threshold": threshold,
            "changed": int((changed > 0).sum()), "items": items}


def _boxes(pred: dict, scale: tuple[float, float], threshold: float | None = None) -> list[dict]:
    """[{box: [x1, y1, x2, y2] in thumbnail pixels, label, score?}], the confident ones, best first."""
    boxes, labels = pred["boxes"], pred["labels"]
    scores = pred.get("scores")
    if scores is not None:
        keep = torch.nonzero(scores >= threshold).flatten()
        keep = keep[torch.argsort(scores[keep], descending=True)][:MAX_BOXES]
        boxes, labels, scores = boxes[keep], labels[keep], scores[keep]
    sx, sy = scale
    xyxy = (boxes.float() * torch.tensor([sx, sy, sx, sy])).tolist()
    out = []
    for j, b in enumerate(xyxy):
        item = {"box": [round(v, 1) for v in b], "label": int(labels[j])}
        if scores is not None:
            item["score"] = round(float(scores[j]), 3)
        out.append(item)
    return out
