"""Detection labels (boxes), checked the same way wherever they come from: npz arrays at submit (the API,
torch-free) and in the worker, COCO JSON in an archive (worker/adaptation/data/archives/coco.py).

The form: `boxes` float M×4 (x1, y1, x2, y2 in the pixel coordinates of the image as uploaded),
`labels` integer M (the model's label ids), `image_index` integer M (which image, 0..N-1). Refusals:
`invalid_detection_labels` (keys, dtypes, shapes, lengths, image_index out of range),
`invalid_box` (not finite, zero or negative width/height), `box_out_of_image` (beyond the image by
more than BOX_TOLERANCE_PX; within it, boxes are clipped to the image)."""
from __future__ import annotations

import numpy as np

from . import CheckError

BOX_KEYS = ("boxes", "labels", "image_index")
BOX_TOLERANCE_PX = 1.0   # float rounding in annotation tools: a box may overhang the image by this much


def check_box_arrays(boxes: np.ndarray, labels: np.ndarray, image_index: np.ndarray, num_images: int,
                     heights: np.ndarray, widths: np.ndarray, where: str = "") -> dict[str, np.ndarray]:
    """The labels as float32/int64 arrays with boxes clipped to their image, or CheckError.
    `heights`/`widths`: each image's size (N), or one value broadcast to all."""
    for name, arr, ndim in (("boxes", boxes, 2), ("labels", labels, 1), ("image_index", image_index, 1)):
        if arr.ndim != ndim:
            raise CheckError("invalid_detection_labels", f"{where}'{name}' must have {ndim} dimension"
                             f"{'s' if ndim > 1 else ''}, got shape {list(arr.shape)}", {"array": name,
                                                                                        "shape": list(arr.shape)})
    if boxes.shape[1] != 4 or not np.issubdtype(boxes.dtype, np.floating) and not np.issubdtype(boxes.dtype,
                                                                                                 np.integer):
        raise CheckError("invalid_detection_labels", f"{where}'boxes' must be M×4 numbers (x1, y1, x2, y2), got "
                         f"{boxes.dtype}{list(boxes.shape)}", {"array": "boxes", "shape": list(boxes.shape),
                                                              "dtype": str(boxes.dtype)})
    for name, arr in (("labels", labels), ("image_index", image_index)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise CheckError("invalid_detection_labels", f"{where}'{name}' must hold integers, got {arr.dtype}",
                             {"array": name, "dtype": str(arr.dtype)})
    m = len(boxes)
    if len(labels) != m or len(image_index) != m:
        raise CheckError("invalid_detection_labels", f"{where}'boxes', 'labels' and 'image_index' must have one "
                         f"row per box, got {m}, {len(labels)} and {len(image_index)}",
                         {"boxes": m, "labels": len(labels), "image_index": len(image_index)})
    if m and (image_index.min() < 0 or image_index.max() >= num_images):
        bad = int(np.flatnonzero((image_index < 0) | (image_index >= num_images))[0])
        raise CheckError("invalid_detection_labels", f"{where}image_index[{bad}] = {int(image_index[bad])} names "
                         f"no image (the set has {num_images})", {"box": bad, "image_index": int(image_index[bad]),
                                                                  "num_images": num_images})
    if m and labels.min() < 0:
        bad = int(np.flatnonzero(labels < 0)[0])
        raise CheckError("invalid_detection_labels", f"{where}labels[{bad}] = {int(labels[bad])} is negative",
                         {"box": bad, "label": int(labels[bad])})
    b = boxes.astype(np.float64)
    bad_rows = np.flatnonzero(~np.isfinite(b).all(1) | (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1]))
    if len(bad_rows):
        i = int(bad_rows[0])
        raise CheckError("invalid_box", f"{where}box {i} {b[i].tolist()} has zero or negative size, or is not "
                         f"finite (boxes are x1, y1, x2, y2 with x2 > x1 and y2 > y1); {len(bad_rows)} such boxes",
                         {"box": i, "xyxy": b[i].tolist(), "count": int(len(bad_rows))})
    idx = image_index.astype(np.int64)
    h = np.broadcast_to(np.asarray(heights, np.float64), (num_images,))[idx]
    w = np.broadcast_to(np.asarray(widths, np.float64), (num_images,))[idx]
    tol = BOX_TOLERANCE_PX
    outside = np.flatnonzero((b[:, 0] < -tol) | (b[:, 1] < -tol) | (b[:, 2] > w + tol) | (b[:, 3] > h + tol))
    if len(outside):
        i = int(outside[0])
        raise CheckError("box_out_of_image", f"{where}box {i} {b[i].tolist()} lies outside its image "
                         f"{int(idx[i])} ({int(w[i])}×{int(h[i])} pixels; boxes are x1, y1, x2, y2 in the pixels "
                         f"of the image as uploaded); {len(outside)} such boxes",
                         {"box": i, "xyxy": b[i].tolist(), "image_index": int(idx[i]), "width": int(w[i]),
                          "height": int(h[i]), "count": int(len(outside))})
    clipped = np.stack([np.clip(b[:, 0], 0, w), np.clip(b[:, 1], 0, h), np.clip(b[:, 2], 0, w),
                        np.clip(b[:, 3], 0, h)], 1) if m else b.reshape(0, 4)
    flat = np.flatnonzero((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
    if len(flat):
        i = int(flat[0])
        raise CheckError("box_out_of_image", f"{where}box {i} {b[i].tolist()} lies on the border of its image "
                         f"{int(idx[i])} ({int(w[i])}×{int(h[i])} pixels): nothing of it is inside",
                         {"box": i, "xyxy": b[i].tolist(), "image_index": int(idx[i]), "width": int(w[i]),
                          "height": int(h[i]), "count": int(len(flat))})
    return {"boxes": clipped.astype(np.float32), "labels": labels.astype(np.int64),
            "image_index": idx}
