"""Box labels of a detection set (tasks/detection.py states the interface): a dict of numpy arrays `boxes`
float32 M×4 xyxy in the image's pixels, `labels` int64 M, `image_index` int64 M. The npz reader takes them
from the members of those names (read without pickle); every reader checks them here against the images'
sizes. Label ids are checked against num_classes later, by the task (`check_labels`)."""
from __future__ import annotations

import numpy as np

from ..errors import AdaptationError

BOX_KEYS = ("boxes", "labels", "image_index")


def from_arrays(arrays: dict) -> dict:
    """The three arrays, typed and shaped, or `invalid_boxes`."""
    missing = [k for k in BOX_KEYS if k not in arrays]
    if missing:
        raise AdaptationError("invalid_boxes", f"box labels need {', '.join(BOX_KEYS)}; missing {missing}",
                              {"missing": missing})
    boxes, labels, index = (np.asarray(arrays[k]) for k in BOX_KEYS)
    if not np.issubdtype(boxes.dtype, np.floating) and not np.issubdtype(boxes.dtype, np.integer):
        raise AdaptationError("invalid_boxes", f"'boxes' must hold numbers, got {boxes.dtype}")
    for name, arr in (("labels", labels), ("image_index", index)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise AdaptationError("invalid_boxes", f"'{name}' must hold integers, got {arr.dtype}")
    m = len(labels)
    if boxes.shape != (m, 4) and not (m == 0 and boxes.size == 0):
        raise AdaptationError("invalid_boxes", f"'boxes' must be M×4 (xyxy) with M = len(labels) = {m}, "
                              f"got {list(boxes.shape)}", {"boxes": list(boxes.shape), "labels": m})
    if labels.shape != (m,) or index.shape != (m,):
        raise AdaptationError("invalid_boxes", "'labels' and 'image_index' must be 1-D and as long as each other",
                              {"labels": list(labels.shape), "image_index": list(index.shape)})
    return {"boxes": boxes.astype(np.float32).reshape(-1, 4), "labels": labels.astype(np.int64),
            "image_index": index.astype(np.int64)}


def check(labels: dict, sizes: np.ndarray, tolerance: float = 1.0) -> None:
    """Refuse boxes that are not finite, of negative size, outside their image (by more than `tolerance`
    pixels: rounding of converted annotations), or whose image index is out of range. `sizes`: N×2 (H, W)
    of the images in stored order."""
    boxes, index = labels["boxes"], labels["image_index"]
    n = len(sizes)
    if len(index) and (index.min() < 0 or index.max() >= n):
        bad = np.nonzero((index < 0) | (index >= n))[0]
        raise AdaptationError("invalid_boxes", f"image_index must lie in 0..{n - 1} (the set has {n} images)",
                              {"box": int(bad[0]), "image_index": int(index[bad[0]]), "num_images": n})
    if not np.isfinite(boxes).all():
        bad = int(np.nonzero(~np.isfinite(boxes).all(1))[0][0])
        raise AdaptationError("invalid_boxes", "box coordinates must be finite", {"box": bad})
    negative = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if negative.any():
        bad = int(np.nonzero(negative)[0][0])
        raise AdaptationError("invalid_boxes", "boxes are xyxy with x2 ≥ x1 and y2 ≥ y1: a box has a negative "
                              "size", {"box": bad, "xyxy": boxes[bad].tolist()})
    if len(boxes):
        h = sizes[index, 0].astype(np.float32)
        w = sizes[index, 1].astype(np.float32)
        outside = ((boxes[:, 0] < -tolerance) | (boxes[:, 1] < -tolerance) | (boxes[:, 2] > w + tolerance)
                   | (boxes[:, 3] > h + tolerance))
        if outside.any():
            bad = int(np.nonzero(outside)[0][0])
            raise AdaptationError("invalid_boxes", "a box lies outside its image (xyxy in the image's pixels)",
                                  {"box": bad, "xyxy": boxes[bad].tolist(), "image_index": int(index[bad]),
                                   "image_size": [int(sizes[index[bad], 0]), int(sizes[index[bad], 1])]})
