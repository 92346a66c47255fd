"""A few example images with the predictions before and after adaptation, for people to look at (the
dashboard's gallery): small PNG thumbnails as data URLs, a few kilobytes per job, stored as the
`examples.json` artifact. Images whose prediction changed come first; the rest are spread over the set."""
from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

COUNT = 8
THUMBNAIL_PX = 48  # the longer side; smaller images are enlarged by the browser, not here


def pick(data, before: torch.Tensor, after: torch.Tensor, labelled: bool, count: int = COUNT) -> dict:
    """`before`/`after`: the probabilities of the source and adapted models over `data`, in stored order."""
    n = len(data)
    pred_b, pred_a = before.argmax(1), after.argmax(1)
    changed = torch.nonzero(pred_b != pred_a).flatten().tolist()
    chosen = changed[: count // 2]
    for i in np.linspace(0, n - 1, min(n, count)).astype(int).tolist():
        if len(chosen) >= min(n, count):
            break
        if i not in chosen:
            chosen.append(i)
    chosen = sorted(chosen)
    images, _ = next(iter(data.batches(len(chosen), np.asarray(chosen, dtype=np.int64))))
    labels = getattr(data, "labels", None) if labelled else None
    items = []
    for k, i in enumerate(chosen):
        items.append({"index": i, "image": thumbnail(images[k].numpy())[0],
                      "label": int(labels[i]) if labels is not None else None,
                      "before": {"class": int(pred_b[i]), "confidence": round(float(before[i].max()), 4)},
                      "after": {"class": int(pred_a[i]), "confidence": round(float(after[i].max()), 4)}})
    return {"set": "eval" if labelled else "target", "class_names": getattr(data, "class_names", None),
            "changed": len(changed), "items": items}


def thumbnail(hwc: np.ndarray, px: int = THUMBNAIL_PX) -> tuple[str, tuple[int, int]]:
    """(PNG data URL, (width, height)) of the image shrunk to fit `px` on its longer side."""
    img = Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)
    img.thumbnail((px, px))
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), img.size
