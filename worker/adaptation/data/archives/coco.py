"""COCO JSON box labels inside an image archive (a detection set): which entry is the annotation file,
and its content turned into the detection label form (app/checks/boxes.py: `boxes` float32 M×4 xyxy in
the pixels of the image as uploaded, `labels` int64 M, `image_index` int64 M over the archive's sorted
images; when images of several sizes are resized to `preprocess.size` while loading, the boxes are scaled
with them, and `ArchiveImageSet.image_sizes` keeps the sizes as uploaded).

The annotation file is the one `.json` entry that is not a WebDataset sample's metadata (no image shares
its key), anywhere in the archive (`annotations.json`, `annotations/instances_val.json`, ...); two such
files are refused (`ambiguous_annotations`). Images are matched by `file_name`: the archive path itself,
the path relative to the JSON's folder, or the file's base name when only one image has it.

Categories: the label id is the COCO `category_id` itself, torchvision's convention (its COCO
checkpoints predict the 91 COCO ids, 0 = background; its detection reference scripts train on the ids
as they are). The task's label check refuses ids the model cannot predict; the mapping is reported
(`metrics.eval.category_mapping`). Crowd regions (`iscrowd: 1`) are left out of the boxes (noted).
Refused: malformed JSON or structure (`invalid_annotations`), an annotation whose image is not in the
archive (`annotation_image_missing`), an archive image the JSON does not list (`image_not_annotated`),
an image whose size disagrees with the JSON's (`annotation_image_size_mismatch`), an unknown category
(`unknown_category`), and the box refusals of app/checks/boxes.py."""
from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np

from app.checks import CheckError
from app.checks.boxes import check_box_arrays

from ...errors import AdaptationError
from .layout import sample_key

ANNOTATION_SUFFIX = ".json"
MAX_ANNOTATION_BYTES = 256 << 20   # COCO 2017 val's instances file is 25 MB, train's 448 MB
MAX_CATEGORY_ID = 1 << 16          # label ids are a model's output indices: small integers
CATEGORY_RULE = ("label = COCO category_id (torchvision's convention: its COCO checkpoints predict the COCO "
                 "ids themselves, 0 = background)")


def find_annotation_file(names: list[str], image_names: list[str]) -> str | None:
    """The archive's COCO annotation entry among `names`, or None (no such entry: not a detection archive)."""
    image_keys = {sample_key(n) for n in image_names}
    found = [n for n in names if n.lower().endswith(ANNOTATION_SUFFIX) and sample_key(n) not in image_keys]
    if len(found) > 1:
        raise AdaptationError("ambiguous_annotations", f"the archive holds {len(found)} JSON files that are not "
                              "WebDataset sample metadata; a detection archive holds one COCO annotation file",
                              {"entries": found[:10]})
    return found[0] if found else None


def check_annotation_size(name: str, usize: int) -> None:
    if usize > MAX_ANNOTATION_BYTES:
        raise AdaptationError("annotations_too_large", f"{name} is {usize} bytes (limit {MAX_ANNOTATION_BYTES} "
                              "for a COCO annotation file)", {"entry": name, "bytes": usize,
                                                              "max_bytes": MAX_ANNOTATION_BYTES})


def _bad(name: str, message: str, **detail) -> AdaptationError:
    return AdaptationError("invalid_annotations", f"{name}: {message}", {"entry": name, **detail})


def _int(value, what: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"{what} must be an integer, got {value!r:.60}")
    return value


def _list(doc: dict, key: str, name: str) -> list:
    value = doc.get(key)
    if not isinstance(value, list):
        raise _bad(name, f"'{key}' must be a list (COCO: images, annotations, categories)", key=key)
    return value


def _matcher(name: str, image_names: list[str]):
    """file_name -> archive image index: the path itself, relative to the JSON's folder, or a unique
    base name."""
    folder = name.rpartition("/")[0]
    exact = {n: i for i, n in enumerate(image_names)}
    relative = {n[len(folder) + 1:]: i for i, n in enumerate(image_names) if folder and n.startswith(folder + "/")}
    base: dict[str, int | None] = {}
    for i, n in enumerate(image_names):
        b = n.rpartition("/")[2]
        base[b] = None if b in base else i   # None: the base name is not unique

    def match(file_name: str) -> int | None:
        f = file_name.replace("\\", "/").lstrip("./")
        for table in (exact, relative):
            if f in table:
                return table[f]
        return base.get(f.rpartition("/")[2])
    return match


def parse_coco(name: str, text: bytes, image_names: list[str], widths: np.ndarray, heights: np.ndarray,
               notes: list[str]) -> tuple[dict[str, np.ndarray], list[str | None], dict]:
    """(labels, class_names by label id, category mapping report) from a COCO annotation file `name`
    over the archive's sorted `image_names` of the given header sizes."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _bad(name, f"not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise _bad(name, "a COCO annotation file is a JSON object with images, annotations and categories")
    images, annotations, categories = (_list(doc, k, name) for k in ("images", "annotations", "categories"))

    cats: dict[int, str] = {}
    for c in categories:
        if not isinstance(c, dict):
            raise _bad(name, "each category must be an object {id, name}")
        cid = _int(c.get("id"), "a category's id", name)
        if not 0 <= cid < MAX_CATEGORY_ID:
            raise AdaptationError("unknown_category", f"{name}: category id {cid} cannot be a model's label id "
                                  f"(0..{MAX_CATEGORY_ID - 1}; the label id is the category id)",
                                  {"category_id": cid})
        if cid in cats:
            raise _bad(name, f"category id {cid} appears twice", category_id=cid)
        cats[cid] = str(c.get("name", cid))

    match = _matcher(name, image_names)
    by_id: dict[int, int] = {}      # COCO image id -> archive image index
    listed: set[int] = set()
    missing_files: dict[int, str] = {}
    for img in images:
        if not isinstance(img, dict) or not isinstance(img.get("file_name"), str):
            raise _bad(name, "each image must be an object with an integer id and a file_name")
        iid = _int(img.get("id"), "an image's id", name)
        if iid in by_id or iid in missing_files:
            raise _bad(name, f"image id {iid} appears twice", image_id=iid)
        i = match(img["file_name"])
        if i is None:
            missing_files[iid] = img["file_name"]
            continue
        if i in listed:
            raise _bad(name, f"two images of the JSON name the same archive file {image_names[i]!r}",
                       file_name=img["file_name"])
        w, h = img.get("width"), img.get("height")
        if (isinstance(w, int) and w != int(widths[i])) or (isinstance(h, int) and h != int(heights[i])):
            raise AdaptationError("annotation_image_size_mismatch", f"{name}: image {iid} ({img['file_name']!r}) "
                                  f"is {w}×{h} in the JSON but {int(widths[i])}×{int(heights[i])} in the archive",
                                  {"image_id": iid, "file_name": img["file_name"], "json": [w, h],
                                   "archive": [int(widths[i]), int(heights[i])]})
        by_id[iid] = i
        listed.add(i)
    unlisted = [n for i, n in enumerate(image_names) if i not in listed]
    if unlisted:
        raise AdaptationError("image_not_annotated", f"{len(unlisted)} images of the archive are not listed in "
                              f"{name} (an image without boxes is still listed, with no annotations)",
                              {"examples": unlisted[:5], "count": len(unlisted)})

    rows, labels, index, source_rows = [], [], [], []
    crowd = 0
    for k, a in enumerate(annotations):
        if not isinstance(a, dict):
            raise _bad(name, f"annotation {k} is not an object", annotation=k)
        iid = _int(a.get("image_id"), f"annotation {k}'s image_id", name)
        cid = _int(a.get("category_id"), f"annotation {k}'s category_id", name)
        if iid not in by_id:
            file_name = missing_files.get(iid)
            raise AdaptationError("annotation_image_missing", f"{name}: annotation {k} is for image {iid}"
                                  + (f" ({file_name!r}), which the archive does not hold" if file_name is not None
                                     else ", which the JSON's images do not list"),
                                  {"annotation": k, "image_id": iid, "file_name": file_name})
        if cid not in cats:
            raise AdaptationError("unknown_category", f"{name}: annotation {k} has category_id {cid}, which is not "
                                  f"among the JSON's categories {sorted(cats)[:20]}",
                                  {"annotation": k, "category_id": cid, "categories": sorted(cats)[:50]})
        bbox = a.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           for v in bbox)):
            raise _bad(name, f"annotation {k}'s bbox must be 4 finite numbers [x, y, width, height], got "
                       f"{bbox!r:.80}", annotation=k)
        if a.get("iscrowd") in (1, True):
            crowd += 1
            continue
        x, y, w, h = (float(v) for v in bbox)
        rows.append((x, y, x + w, y + h))
        labels.append(cid)
        index.append(by_id[iid])
        source_rows.append(k)
    if missing_files:
        notes.append(f"{len(missing_files)} images listed in {name} are not in the archive and have no "
                     "annotations: ignored")
    if crowd:
        notes.append(f"{crowd} crowd annotations (iscrowd: 1) left out of the boxes")
    boxes = np.asarray(rows, np.float64).reshape(-1, 4)
    try:
        out = check_box_arrays(boxes, np.asarray(labels, np.int64), np.asarray(index, np.int64), len(image_names),
                               heights, widths)
    except CheckError as exc:  # name the annotation (crowd ones are not among the boxes)
        k = source_rows[exc.detail["box"]] if "box" in exc.detail else None
        raise AdaptationError(exc.code, f"{name}: annotation {k} (bbox as x, y, width, height: "
                              f"{annotations[k].get('bbox')}): {exc.message}" if k is not None else exc.message,
                              {**exc.detail, "annotation": k, "entry": name}) from None
    counts = Counter(labels)
    class_names: list[str | None] = [None] * (max(cats) + 1 if cats else 0)
    for cid, cname in cats.items():
        class_names[cid] = cname
    mapping = {"rule": CATEGORY_RULE, "source": name,
               "categories": [{"category_id": cid, "name": cats[cid], "label": cid, "boxes": counts.get(cid, 0)}
                              for cid in sorted(cats)]}
    return out, class_names, mapping


def resize_boxes(labels: dict[str, np.ndarray], widths: np.ndarray, heights: np.ndarray,
                 out_hw: tuple[int, int]) -> dict[str, np.ndarray]:
    """Box labels in the pixels of the images as the set yields them, when images of several sizes are
    resized to one (`preprocess.size`): each box scaled with its image."""
    idx = labels["image_index"]
    sx = out_hw[1] / widths[idx].astype(np.float64)
    sy = out_hw[0] / heights[idx].astype(np.float64)
    boxes = labels["boxes"] * np.stack([sx, sy, sx, sy], 1)
    return {**labels, "boxes": boxes.astype(np.float32)}
