"""A class-ratio prior file (sfda_prior's `params.prior_upload`), read and checked the same way at submit
(the API) and in the worker (standard library only). Bateson et al. estimate the prior of each target image
from one typical size per class times the image's tags (a class the image does not hold gets 0); a file
gives that directly, or per-image proportions or pixel counts.

JSON, one of
    [p_0, ..., p_K-1]                                one row for every image
    [[p_0, ..., p_K-1], ...]                         one row per target image, in stored order
    {"proportions": <a row or rows>}                 the same
    {"sizes": <a row or rows>, "tags": [[0/1, ...], ...], "class_names": [...]}
                                                      sizes (pixels) per class, times each image's tags
    optional "images": [name, ...]                  names the image of each row (below)
CSV: a header row of K class names or indices 0..K-1 (an optional first column `image` names each row's
image), then one row of K numbers per image, or one row for all; columns `tag:<class>` beside them are that
image's tags (1 present, 0 absent), one per class in the same order.

Rows without names follow the target set's stored order (npz index; archives sorted by path). Named rows
are matched to the target images by file name without its folder and extension (`case01.png` ↔
`images/case01.png`; an npz's images are named by their index, `0`, `1`, ...), in any order: every target
image needs its row, and every row its image.

Every row is normalised to sum 1 (so proportions and pixel counts mean the same); numbers are finite and
non-negative, and each image keeps at least one class with a positive size."""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass

from . import CheckError

MAX_PRIOR_BYTES = 32 << 20
TAG_PREFIX = "tag:"
IMAGE_COLUMN = "image"


def _refuse(message: str, **detail) -> CheckError:
    return CheckError("invalid_prior", message, detail)


def image_key(name: str) -> str:
    """What a prior row's image name and a target image's name are matched on: the file name without its
    folder and extension."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    return base.rsplit(".", 1)[0] if "." in base[1:] else base


@dataclass(frozen=True)
class Prior:
    sizes: list[list[float]]                # 1×K (every image) or N×K
    tags: list[list[float]] | None = None   # N×K (or 1×K) of 0/1, or None
    class_names: list[str] | None = None
    images: list[str] | None = None         # the image each row is for, when named

    @property
    def num_classes(self) -> int:
        return len(self.sizes[0])

    @property
    def num_rows(self) -> int:
        return max(len(self.sizes), len(self.tags or []))

    def rows(self, num_classes: int, num_images: int | None, names: list[str] | None = None) -> list[list[float]]:
        """The per-image proportions (one row for all images, or one per image in stored order), each
        summing to 1. `num_images` None: not known yet (checked by the worker); `names`: the target images'
        names in stored order, to put named rows in that order."""
        if self.num_classes != num_classes:
            raise CheckError("prior_shape_mismatch", f"the prior has {self.num_classes} classes, the model "
                             f"predicts {num_classes}", {"classes": self.num_classes, "num_classes": num_classes})
        if self.images is not None and names is not None:
            return self._ordered(names).rows(num_classes, num_images)
        n = self.num_rows
        if n != 1 and num_images is not None and n != num_images:
            raise CheckError("prior_shape_mismatch", f"the prior has {n} rows: give one for every image, or one "
                             f"per target image ({num_images}, in stored order)", {"rows": n, "images": num_images})
        out = []
        for i in range(n):
            size = self.sizes[i if len(self.sizes) > 1 else 0]
            tag = self.tags[i if len(self.tags) > 1 else 0] if self.tags else [1.0] * len(size)
            row = [s * t for s, t in zip(size, tag)]
            total = sum(row)
            if total <= 0:
                raise _refuse(f"row {i}: no class has a positive size (every class tagged absent or 0)", row=i)
            out.append([v / total for v in row])
        return out


    def _ordered(self, names: list[str]) -> "Prior":
        """The rows rearranged into the target set's order, matched by image name."""
        keys = [image_key(n) for n in names]
        where = {k: i for i, k in enumerate(keys)}
        if len(where) != len(keys):
            twice = sorted({k for k in keys if keys.count(k) > 1})[:5] if len(keys) < 10_000 else []
            raise CheckError("prior_shape_mismatch", "the target images' file names repeat (in different folders): "
                             "name the prior's rows in stored order instead (no image column)", {"repeated": twice})
        given = {image_key(n): i for i, n in enumerate(self.images)}
        missing = [n for n, k in zip(names, keys) if k not in given]
        unknown = [n for n in self.images if image_key(n) not in where]
        if missing or unknown:
            raise CheckError("prior_shape_mismatch", f"the prior's image names do not match the target images: "
                             f"{len(missing)} images have no row, {len(unknown)} rows name no image",
                             {"images_without_row": missing[:5], "rows_without_image": unknown[:5]})
        pick = [given[k] for k in keys]
        return Prior([self.sizes[i] for i in pick] if len(self.sizes) > 1 else self.sizes,
                     [self.tags[i] for i in pick] if self.tags and len(self.tags) > 1 else self.tags,
                     self.class_names, None)


def _names(value, rows: int) -> list[str]:
    if (not isinstance(value, list) or len(value) != rows or not all(isinstance(n, str) and n.strip() for n in value)):
        raise _refuse(f"images: {rows} file names, one per row")
    keys = [image_key(n) for n in value]
    if len(set(keys)) != len(keys):
        raise _refuse("images: a file name appears twice (names are matched without folder and extension)",
                      repeated=sorted({k for k in keys if keys.count(k) > 1})[:5])
    return value


def _numbers(value, what: str, k: int | None = None) -> list[list[float]]:
    """A row or a list of rows of finite non-negative numbers -> rows (all of one length ≥ 2)."""
    if not isinstance(value, list) or not value:
        raise _refuse(f"{what}: a list of numbers (one per class) or a list of such lists")
    rows = value if isinstance(value[0], list) else [value]
    k = k or len(rows[0])
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != k or k < 2:
            raise _refuse(f"{what} row {i}: {k if k >= 2 else 'at least 2'} numbers, one per class, like the first "
                          "row", row=i)
        for j, v in enumerate(row):
            if isinstance(v, bool) and what == "tags":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise _refuse(f"{what} row {i}, class {j}: {v!r} is not a finite non-negative number", row=i,
                              column=j)
    return [[float(v) for v in row] for row in rows]


def _tags(value, k: int) -> list[list[float]]:
    rows = _numbers(value, "tags", k)
    for i, row in enumerate(rows):
        if any(v not in (0.0, 1.0) for v in row):
            raise _refuse(f"tags row {i}: 1 (the class is in the image) or 0 (absent) per class", row=i)
    return rows


def _from_json(value) -> Prior:
    if isinstance(value, list):
        return Prior(_numbers(value, "proportions"))
    if not isinstance(value, dict):
        raise _refuse("a JSON prior is a list of proportions or an object with 'proportions' or 'sizes'")
    unknown = sorted(set(value) - {"proportions", "sizes", "tags", "class_names", "images"})
    if unknown or ("proportions" in value) == ("sizes" in value):
        raise _refuse("a JSON prior object holds 'proportions', or 'sizes' with optional 'tags' (and optional "
                      "'class_names')", keys=sorted(value)[:10])
    if "proportions" in value and "tags" in value:
        raise _refuse("'tags' go with 'sizes' (one typical size per class times each image's tags)")
    sizes = _numbers(value.get("proportions", value.get("sizes")), "proportions" if "proportions" in value else "sizes")
    k = len(sizes[0])
    names = value.get("class_names")
    if names is not None and (not isinstance(names, list) or len(names) != k
                              or not all(isinstance(n, str) for n in names)):
        raise _refuse(f"class_names: {k} strings, one per class")
    tags = _tags(value["tags"], k) if value.get("tags") is not None else None
    if tags is not None and len(sizes) > 1 and len(tags) > 1 and len(tags) != len(sizes):
        raise _refuse(f"{len(sizes)} rows of sizes and {len(tags)} rows of tags: give one row of sizes, or one "
                      "per image like the tags")
    prior = Prior(sizes, tags, names)
    return prior if value.get("images") is None else Prior(sizes, tags, names, _names(value["images"], prior.num_rows))


def _cell(text: str, i: int, j: int) -> float:
    try:
        v = float(text)
    except ValueError:
        raise _refuse(f"CSV row {i + 1}, column {j + 1}: {text[:40]!r} is not a number", row=i, column=j) from None
    if not math.isfinite(v) or v < 0:
        raise _refuse(f"CSV row {i + 1}, column {j + 1}: {text[:40]!r} is not a finite non-negative number",
                      row=i, column=j)
    return v


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _from_csv(text: str) -> Prior:
    lines = [row for row in csv.reader(io.StringIO(text)) if any(c.strip() for c in row)]
    if len(lines) < 2:
        raise _refuse("a CSV prior has a header row (class names or indices) and at least one row of numbers")
    header = [c.strip() for c in lines[0]]
    skip = 1 if header and header[0].lower() == IMAGE_COLUMN else 0
    classes = [j for j in range(skip, len(header)) if not header[j].lower().startswith(TAG_PREFIX)]
    tag_cols = [j for j in range(skip, len(header)) if header[j].lower().startswith(TAG_PREFIX)]
    names = [header[j] for j in classes]
    if len(names) < 2 or len(set(names)) != len(names):
        raise _refuse("the CSV header names each class once (at least 2): class names or indices 0..K-1",
                      header=header[:20])
    try:
        as_indices = [int(n) for n in names]
    except ValueError:
        as_indices = None
    if as_indices is None and all(_is_number(n) for n in names):
        raise _refuse("the CSV's first row holds numbers: a CSV prior starts with a header row of class names or "
                      "indices 0..K-1", header=names[:20])
    if as_indices is not None and as_indices != list(range(len(names))):
        raise _refuse("a CSV header of class indices lists 0..K-1 in order", header=names[:20])
    if tag_cols and [header[j][len(TAG_PREFIX):].strip() for j in tag_cols] != names:
        raise _refuse(f"tag columns are {TAG_PREFIX}<class> for every class, in the order of the class columns",
                      header=header[:20])
    sizes, tags, images = [], [], []
    for i, row in enumerate(lines[1:]):
        if len(row) != len(header):
            raise _refuse(f"CSV row {i + 1} has {len(row)} cells, the header {len(header)}", row=i)
        if skip:
            images.append(row[0].strip())
        sizes.append([_cell(row[j].strip(), i, j) for j in classes])
        if tag_cols:
            tags.append([_cell(row[j].strip(), i, j) for j in tag_cols])
    return Prior(sizes, _tags(tags, len(names)) if tag_cols else None,
                 None if as_indices is not None else names, _names(images, len(sizes)) if skip else None)


def read_prior(data: bytes) -> Prior:
    """A prior file's bytes (JSON or CSV, told apart by the first character) -> Prior; CheckError
    ("invalid_prior") with the row and column of the first problem."""
    if len(data) > MAX_PRIOR_BYTES:
        raise _refuse(f"the prior file is {len(data)} bytes (limit {MAX_PRIOR_BYTES})", limit_bytes=MAX_PRIOR_BYTES)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _refuse("the prior file is not UTF-8 text (JSON or CSV)") from None
    if text.lstrip()[:1] in ("[", "{"):
        try:
            value = json.loads(text, parse_constant=lambda c: math.nan)  # NaN/Infinity: refused as numbers
        except (ValueError, RecursionError) as exc:
            raise _refuse(f"not valid JSON: {str(exc)[:200]}") from None
        return _from_json(value)
    try:
        return _from_csv(text)
    except csv.Error as exc:  # e.g. a field past the csv module's size limit
        raise _refuse(f"not a readable CSV: {exc}") from None
