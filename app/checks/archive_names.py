"""What an image archive's entry names mean, as far as the API's submit checks and the worker's reader
share it (standard library only): which names are ignored, and the segmentation layout — `images/NAME.ext`
beside `masks/NAME.png` (an optional common wrapper folder above both). Names are only compared, never
joined onto the filesystem."""
from __future__ import annotations

from dataclasses import dataclass

from . import CheckError

IGNORED_DIRS = ("__MACOSX",)
IGNORED_FILES = ("Thumbs.db", "desktop.ini")
IMAGES_DIR, MASKS_DIR = "images", "masks"
MASK_SUFFIX = ".png"  # lossless: a JPEG would blur class indices at every edge


def ignored(name: str) -> bool:
    parts = name.split("/")
    return (any(p in IGNORED_DIRS or p.startswith(".") for p in parts) or parts[-1] in IGNORED_FILES)


@dataclass(frozen=True)
class MaskLayout:
    """The images (archive names, in the order given) and, when the archive holds `masks/`, the mask of
    each image (same order); `masks` is None for an unlabelled segmentation archive."""

    images: list[str]
    masks: list[str] | None


def _key(rest: list[str]) -> str:
    """`a/b.png` under images/ or masks/ -> `a/b`: the name without its extension pairs an image with its mask."""
    return "/".join(rest[:-1] + [rest[-1].rsplit(".", 1)[0]])


def mask_layout(names: list[str]) -> MaskLayout:
    """The segmentation layout of an archive's image entries (normalised 'a/b' names, ignored ones left
    out): flat or `images/` alone -> unlabelled; `images/` + `masks/` -> one PNG mask per image, paired by
    the path under the folder without its extension. CheckError otherwise (`invalid_archive_layout`,
    `missing_mask`, `mask_without_image`, `invalid_mask`)."""
    parts = [n.split("/") for n in names]
    strip = 0  # a common wrapper folder above images/ and masks/ (never images/ itself)
    while (parts and all(len(p) > strip + 1 for p in parts) and len({p[strip] for p in parts}) == 1
           and parts[0][strip] not in (IMAGES_DIR, MASKS_DIR)):
        strip += 1
    if all(len(p) == strip + 1 for p in parts):
        return MaskLayout(list(names), None)  # flat: images only
    top = {p[strip] for p in parts}
    stray = [n for p, n in zip(parts, names) if len(p) == strip + 1 or p[strip] not in (IMAGES_DIR, MASKS_DIR)]
    if stray or IMAGES_DIR not in top:
        raise CheckError("invalid_archive_layout", "a segmentation archive holds images/NAME.ext and masks/NAME.png "
                         "(masks optional in the target data), or only images at its top level",
                         {"examples": (stray or names)[:5], "folders": sorted(top)[:10]})
    images: dict[str, str] = {}
    masks: dict[str, str] = {}
    twice = []
    for p, n in zip(parts, names):
        key = _key(p[strip + 1:])
        if p[strip] == MASKS_DIR and not n.lower().endswith(MASK_SUFFIX):
            raise CheckError("invalid_mask", f"{n}: masks are PNG files (L or palette: pixel value = class, "
                             "255 = ignore)", {"entry": n})
        into = images if p[strip] == IMAGES_DIR else masks
        if key in into:
            twice.append(n)
        into[key] = n
    if twice:
        raise CheckError("invalid_archive_layout", f"{len(twice)} images or masks share a name without their "
                         "extension (one image and one mask per NAME)", {"examples": twice[:5]})
    if not masks:
        return MaskLayout(list(images.values()), None)
    missing = [n for k, n in images.items() if k not in masks]
    if missing:
        raise CheckError("missing_mask", f"{len(missing)} images have no mask (masks/NAME.png for images/NAME.ext; "
                         "an archive with masks/ masks every image)", {"examples": missing[:5], "count": len(missing)})
    orphans = [n for k, n in masks.items() if k not in images]
    if orphans:
        raise CheckError("mask_without_image", f"{len(orphans)} masks have no image (images/NAME.ext for "
                         "masks/NAME.png)", {"examples": orphans[:5], "count": len(orphans)})
    return MaskLayout(list(images.values()), [masks[k] for k in images])
