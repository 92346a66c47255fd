"""A few example images with the predictions before and after adaptation, for people to look at (the
dashboard's gallery): small PNG thumbnails as data URLs, a few kilobytes per job, stored as the
`examples.json` artifact. Images whose prediction changed come first; the rest are spread over the set."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import torch
from PIL import Image

COUNT = 8
THUMBNAIL_PX = 48  # the longer side; smaller images are enlarged by the browser, not here


def choose(changed, count: int) -> list[int]:
    """Up to `count` image indices out of `len(changed)`: the most changed first (at most half of them, and
    only images that changed at all), then images spread evenly over the set."""
    changed = np.asarray(changed, dtype=np.float64)
    n = len(changed)
    chosen = [int(i) for i in np.argsort(-changed, kind="stable")[: count // 2] if changed[i] > 0]
    for i in np.linspace(0, n - 1, min(n, count)).astype(int).tolist():
        if len(chosen) >= min(n, count):
            break
        if i not in chosen:
            chosen.append(i)
    return chosen


def pick(data, before: torch.Tensor, after: torch.Tensor, labelled: bool, count: int = COUNT) -> dict:
    """`before`/`after`: the probabilities of the source and adapted models over `data`, in stored order."""
    pred_b, pred_a = before.argmax(1), after.argmax(1)
    changed = (pred_b != pred_a).numpy()
    chosen = sorted(choose(changed, count))
    images, _ = next(iter(data.batches(len(chosen), np.asarray(chosen, dtype=np.int64))))
    labels = getattr(data, "labels", None) if labelled else None
    items = []
    for k, i in enumerate(chosen):
        items.append({"index": i, "image": thumbnail(images[k].numpy())[0],
                      "label": int(labels[i]) if labels is not None else None,
                      "before": {"class": int(pred_b[i]), "confidence": round(float(before[i].max()), 4)},
                      "after": {"class": int(pred_a[i]), "confidence": round(float(after[i].max()), 4)}})
    return {"set": "eval" if labelled else "target", "class_names": getattr(data, "class_names", None),
            "changed": int(changed.sum()), "items": items}


def thumbnail(hwc: np.ndarray, px: int = THUMBNAIL_PX) -> tuple[str, tuple[int, int]]:
    """(PNG data URL, (width, height)) of the image shrunk to fit `px` on its longer side."""
    img = Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)
    img.thumbnail((px, px))
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), img.size


# --- segmentation: masks before / after (and the ground truth) -------------------------------------

MASK_COUNT = 6
MASK_THUMBNAIL_PX = 64
MASK_BUDGET_BYTES = 48_000  # the whole gallery: items past it are left out (photos compress less than digits)
IGNORE = 255
# Class colours (class 0, background, dark); beyond these, evenly spread hues. The dashboard's legend
# reads them from examples.json, so image and legend always agree.
BASE_COLOURS = ["#1f2430", "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#42d4f4",
                "#f032e6", "#bfef45", "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000",
                "#aaffc3", "#808000", "#ffd8b1", "#000075"]


def class_colours(k: int) -> list[str]:
    import colorsys

    out = BASE_COLOURS[:k]
    for i in range(len(out), k):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.65, 0.95)
        out.append(f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}")
    return out


def pick_masks(data, before: dict, after: dict, labelled: bool, num_classes: int,
               count: int = MASK_COUNT) -> dict:
    """`before`/`after`: the segmentation predictions of the source and adapted models over `data` (their
    `mask`, N×h×w at the model's resolution). The images whose mask changed most come first (up to half),
    the rest are spread over the set; each with its masks as palette PNGs at the thumbnail's size (255 =
    ignore: the palette's last entry, transparent), and its pixel accuracy before/after when labelled."""
    import torch.nn.functional as F

    mb, ma = before["mask"], after["mask"]
    changed = (mb != ma).float().mean(dim=(1, 2))
    chosen = choose(changed.numpy(), count)  # kept in this order: most changed first
    images, _ = next(iter(data.batches(len(chosen), np.asarray(chosen, dtype=np.int64))))
    labels = getattr(data, "labels", None) if labelled else None
    colours = class_colours(num_classes)
    palette = _palette(colours)
    items, spent = [], 0
    for k, i in enumerate(chosen):
        image = _thumbnail_image(images[k].numpy())
        size = image.size  # (width, height)
        item = {"index": i, "image": _data_url(image), "changed": round(float(changed[i]), 4),
                "before": {"mask": _mask_url(mb[i].numpy(), size, palette)},
                "after": {"mask": _mask_url(ma[i].numpy(), size, palette)}, "label": None}
        if labels is not None:
            truth = torch.from_numpy(np.asarray(labels[i]))
            item["label"] = {"mask": _mask_url(truth.numpy(), size, palette)}
            keep = truth != IGNORE
            for side, m in (("before", mb[i]), ("after", ma[i])):
                pred = F.interpolate(m[None, None].float(), size=truth.shape, mode="nearest")[0, 0].to(truth.dtype)
                item[side]["pixel_accuracy"] = (round(float((pred[keep] == truth[keep]).float().mean()), 4)
                                                if keep.any() else None)
        spent += len(json.dumps(item))
        if items and spent > MASK_BUDGET_BYTES:
            break
        items.append(item)
    return {"set": "eval" if labelled else "target", "kind": "masks",
            "class_names": getattr(data, "class_names", None), "colours": colours,
            "changed": int((changed > 0).sum()), "items": items}


def _thumbnail_image(hwc: np.ndarray) -> Image.Image:
    img = Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)
    img.thumbnail((MASK_THUMBNAIL_PX, MASK_THUMBNAIL_PX))
    return img


def _palette(colours: list[str]) -> list[int]:
    """K class colours, then one more entry for ignored pixels (transparent): a short palette keeps each
    mask PNG at a few hundred bytes."""
    flat = [int(hexa[j:j + 2], 16) for hexa in colours[:255] for j in (1, 3, 5)]
    return flat + [0, 0, 0]


def _mask_url(mask: np.ndarray, size: tuple[int, int], palette: list[int]) -> str:
    """Pixel = class index; ignored pixels (255) are the palette's last entry, transparent."""
    k = len(palette) // 3 - 1
    mask = np.where(mask == IGNORE, k, np.minimum(mask, k)).astype(np.uint8)
    img = Image.frombytes("P", (mask.shape[1], mask.shape[0]), np.ascontiguousarray(mask).tobytes())
    img.putpalette(palette)
    return _data_url(img.resize(size, Image.Resampling.NEAREST), transparency=k)


def _data_url(img: Image.Image, **save) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True, **save)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
