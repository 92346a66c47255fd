"""What an archive's entry names mean: which are validated paths and how the folder structure turns
into labels (flat: unlabelled; one folder per class: labelled). Which names are ignored, and the
segmentation layout (images/ + masks/), are shared with the API: app/checks/archive_names.py. A name is
never joined onto the filesystem."""
from __future__ import annotations

import re

import numpy as np

from ...errors import AdaptationError

_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


def normalise(raw: str) -> str:
    """Validate an archive path and return it as 'a/b/c' (it is never used as a filesystem path)."""
    name = raw.replace("\\", "/")
    if "\x00" in name or name.startswith("/") or _WINDOWS_DRIVE.match(name):
        raise AdaptationError("archive_path_traversal", f"absolute path in the archive: {raw!r}", {"entry": raw})
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise AdaptationError("archive_path_traversal", f"'..' in an archive path: {raw!r}", {"entry": raw})
    return "/".join(parts)


def duplicates(names: list[str]) -> list[str]:
    seen, dupes = set(), []
    for n in names:
        if n in seen:
            dupes.append(n)
        seen.add(n)
    return dupes


def folder_labels(names: list[str], notes: list[str]) -> tuple[np.ndarray | None, list[str] | None]:
    """(labels, class_names) from sorted image paths: flat -> (None, None); one folder per class ->
    labels in the order of the sorted folder names (as torchvision's ImageFolder). A common top-level
    folder is a wrapper, not a class."""
    parts = [n.split("/") for n in names]
    strip = 0
    while all(len(p) > strip + 1 for p in parts) and len({p[strip] for p in parts}) == 1:
        strip += 1
    if strip:
        notes.append(f"common top-level folder {'/'.join(parts[0][:strip])!r} treated as a wrapper "
                     "(a labelled archive has at least two class folders)")
    depths = {len(p) - strip for p in parts}
    if depths == {1}:
        return None, None
    if depths == {2}:
        class_names = sorted({p[strip] for p in parts})
        lookup = {c: k for k, c in enumerate(class_names)}
        labels = np.fromiter((lookup[p[strip]] for p in parts), np.int64, len(parts))
        if all(c.isdigit() for c in class_names) and class_names != sorted(class_names, key=int):
            notes.append("class folders are numbers, ordered as text (like torchvision's ImageFolder): "
                         f"{class_names[:4]}...; see class_names for the label of each folder")
        return labels, class_names
    flat = [n for p, n in zip(parts, names) if len(p) - strip == 1][:3]
    nested = [n for p, n in zip(parts, names) if len(p) - strip > 2][:3]
    raise AdaptationError("invalid_archive_layout",
                          "an image archive is either flat (images at the top level) or holds one folder per "
                          "class with the images directly inside",
                          {"top_level_examples": flat, "nested_examples": nested,
                           "depths": sorted(d for d in depths)})


# --- WebDataset shards: `<key>.jpg` beside `<key>.cls` ------------------------------------------------

LABEL_SUFFIX = ".cls"                       # the integer class of the sample with the same key
SIDECAR_SUFFIXES = (LABEL_SUFFIX, ".json", ".txt")  # per-sample metadata files of a WebDataset shard
MAX_LABEL_BYTES = 64


def is_sidecar(name: str) -> bool:
    return name.lower().endswith(SIDECAR_SUFFIXES)


def sample_key(name: str) -> str:
    """WebDataset's sample key: the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    return f"{folder}/{base.split('.', 1)[0]}" if folder else base.split(".", 1)[0]


def sidecar_labels(names: list[str], sidecars: dict[str, bytes | None], notes: list[str]) -> np.ndarray:
    """Labels of the images `names` from the `.cls` files among `sidecars` (name -> content; None
    for metadata files, which are not read). Every image needs one."""
    labels_by_key: dict[str, int] = {}
    for name, text in sidecars.items():
        if not name.lower().endswith(LABEL_SUFFIX):
            continue
        try:
            value = int((text or b"").decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            value = -1
        if value < 0:
            raise AdaptationError("invalid_label", f"{name} must hold a non-negative integer class, got "
                                  f"{(text or b'')[:MAX_LABEL_BYTES]!r}", {"entry": name})
        labels_by_key[sample_key(name)] = value
    keys = [sample_key(n) for n in names]
    twice = duplicates(keys)
    if twice:
        raise AdaptationError("invalid_archive_layout", f"{len(twice)} samples hold more than one image (one "
                              "image per WebDataset key)", {"keys": twice[:5]})
    missing = [n for n, k in zip(names, keys) if k not in labels_by_key]
    if missing:
        raise AdaptationError("invalid_archive_layout", f"{len(missing)} images have no {LABEL_SUFFIX} file "
                              "(a WebDataset shard labels every sample or none)", {"examples": missing[:5]})
    others = len(sidecars) - len(labels_by_key)
    notes.append(f"WebDataset shard: labels from {len(labels_by_key)} {LABEL_SUFFIX} files"
                 + (f"; {others} .json/.txt metadata files not read" if others else ""))
    return np.fromiter((labels_by_key[k] for k in keys), np.int64, len(keys))
