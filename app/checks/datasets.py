"""A dataset upload's format and, for npz, its arrays' headers (dtype and shape, from each member's
first bytes), checked at submit the way the worker's reader would refuse them later; for a segmentation
job also its masks: an npz's `y` shape, a zip's images/ + masks/ layout (from its directory alone)."""
from __future__ import annotations

import ast
import struct
import zipfile
from typing import IO

import numpy as np

from . import CheckError
from .boxes import BOX_KEYS, check_box_arrays
from .archive_names import ignored, mask_layout
from .formats import detect_format

NPY_MAGIC = b"\x93NUMPY"
MAX_BOX_LABEL_BYTES = 64 << 20  # box arrays up to this size are checked value by value at submit (~4M boxes)


def _npy_header(raw: IO[bytes], name: str) -> tuple[str, tuple[int, ...]]:
    head = raw.read(10)
    if not head.startswith(NPY_MAGIC) or len(head) < 10:
        raise CheckError("invalid_dataset", f"npz member {name!r} is not a .npy array")
    # Format 1.0: a 2-byte header length; 2.0 and 3.0: 4 bytes.
    (n,) = struct.unpack("<H", head[8:10]) if head[6] == 1 else struct.unpack("<I", head[8:10] + raw.read(2))
    try:
        header = ast.literal_eval(raw.read(min(n, 65536)).decode("latin1"))
        return str(header["descr"]), tuple(int(d) for d in header["shape"])
    except (ValueError, SyntaxError, KeyError, TypeError):
        raise CheckError("invalid_dataset", f"npz member {name!r} has an unreadable .npy header") from None


def check_npz(f: IO[bytes], box_labels: bool = False) -> dict:
    """{"x": shape, "y": shape?, "boxes": count?}; refuses what the worker's npz reader refuses.
    `box_labels`: the set must carry detection labels (a detection job's eval_data), checked in full."""
    f.seek(0)
    try:
        with zipfile.ZipFile(f) as zf:
            names = zf.namelist()
            if "x.npy" not in names:
                raise CheckError("invalid_dataset", f"npz has no 'x' array (found: {[n[:-4] for n in names][:20]})",
                                 {"arrays": [n[:-4] for n in names][:20]})
            with zf.open("x.npy") as raw:
                x_descr, x_shape = _npy_header(raw, "x")
            y = None
            if "y.npy" in names:
                with zf.open("y.npy") as raw:
                    y = _npy_header(raw, "y")
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckError("invalid_dataset", f"not a readable npz file: {exc}") from None
    if x_descr.lstrip("|<>=") != "u1":
        raise CheckError("invalid_dataset", f"'x' must be uint8, got dtype {x_descr!r}", {"dtype": x_descr})
    if len(x_shape) not in (3, 4) or x_shape[0] == 0 or (len(x_shape) == 4 and x_shape[-1] not in (1, 3, 4)):
        raise CheckError("invalid_dataset", f"'x' must be N×H×W or N×H×W×C (C in 1,3,4), got {list(x_shape)}",
                         {"shape": list(x_shape)})
    out = {"x": list(x_shape), "images": x_shape[0]}
    if box_labels:
        try:
            with zipfile.ZipFile(f) as zf:
                out["boxes"] = _check_box_members(zf, names, x_shape)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise CheckError("invalid_dataset", f"not a readable npz file: {exc}") from None
    if y is not None and len(y[1]) == 3 and y[1] != x_shape[:3]:
        raise CheckError("mask_size_mismatch", f"'y' masks must be N×H×W like the images {list(x_shape[:3])}, got "
                         f"{list(y[1])}", {"images": list(x_shape[:3]), "masks": list(y[1])})
    if y is not None:
        descr, shape = y
        # One integer label per image (classification) or per pixel (segmentation masks): the task's own
        # check in the worker says which.
        if shape[:1] != (x_shape[0],) or descr.lstrip("|<>=")[:1] not in ("i", "u"):
            raise CheckError("invalid_dataset", f"'y' must hold integer labels for the {x_shape[0]} images, got "
                             f"{descr}{list(shape)}", {"dtype": descr, "shape": list(shape)})
        out["y"] = list(shape)
    return out


def _check_box_members(zf: zipfile.ZipFile, names: list[str], x_shape: tuple[int, ...]) -> int:
    """A detection set's `boxes`, `labels`, `image_index` (app/checks/boxes.py), read without pickle:
    headers always, values too when the three arrays are small enough to hold in the API process.
    Returns the box count."""
    missing = [k for k in BOX_KEYS if f"{k}.npy" not in names]
    if missing:
        found = [n[:-4] for n in names][:20]
        if "y.npy" in names and len(missing) == len(BOX_KEYS):
            raise CheckError("detection_labels_missing", "a detection job's eval_data npz carries box labels "
                             "('boxes' M×4 float32 x1,y1,x2,y2; 'labels' M int64; 'image_index' M int64), not "
                             "'y' (one class per image is classification's form)", {"arrays": found})
        raise CheckError("detection_labels_missing", f"a detection job's eval_data npz lacks {missing} (box "
                         "labels: 'boxes' M×4 float32 x1,y1,x2,y2; 'labels' M int64; 'image_index' M int64)",
                         {"missing": missing, "arrays": found})
    headers = {}
    for key in BOX_KEYS:
        with zf.open(f"{key}.npy") as raw:
            headers[key] = _npy_header(raw, key)
    for key, (descr, shape) in headers.items():
        kind = descr.lstrip("|<>=")[:1]
        ok = kind in ("f", "i", "u") if key == "boxes" else kind in ("i", "u")
        if not ok:
            wanted = "numbers" if key == "boxes" else "integers"
            raise CheckError("invalid_detection_labels", f"'{key}' must hold {wanted}, got dtype {descr!r}",
                             {"array": key, "dtype": descr})
    m = headers["boxes"][1][0] if headers["boxes"][1] else -1
    small = sum(zf.getinfo(f"{k}.npy").file_size for k in BOX_KEYS) <= MAX_BOX_LABEL_BYTES
    if small:
        arrays = {}
        for key in BOX_KEYS:
            with zf.open(f"{key}.npy") as raw:
                try:
                    arrays[key] = np.lib.format.read_array(raw, allow_pickle=False)
                except ValueError as exc:
                    raise CheckError("invalid_detection_labels", f"'{key}' could not be read without pickle: "
                                     f"{exc}", {"array": key}) from None
        check_box_arrays(arrays["boxes"], arrays["labels"], arrays["image_index"], x_shape[0], x_shape[1],
                         x_shape[2])
        return len(arrays["boxes"])
    shapes = {k: s for k, (_, s) in headers.items()}
    if (len(shapes["boxes"]) != 2 or shapes["boxes"][1:] != (4,) or shapes["labels"] != (m,)
            or shapes["image_index"] != (m,)):
        raise CheckError("invalid_detection_labels", "'boxes' must be M×4, 'labels' and 'image_index' M, got "
                         f"{ {k: list(v) for k, v in shapes.items()} }", {k: list(v) for k, v in shapes.items()})
    return m


def zip_names(f: IO[bytes]) -> list[str] | None:
    """A zip's file names as the archive reader sees them (directories and ignored entries left out), from
    its central directory; None when a name is one the reader refuses (it says why, precisely)."""
    f.seek(0)
    try:
        with zipfile.ZipFile(f) as zf:
            raw = [i.filename for i in zf.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckError("invalid_archive", f"not a readable zip archive: {exc}") from None
    names = []
    for name in raw:
        parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
        if ".." in parts or name.startswith(("/", "\\")) or "\x00" in name or (name[1:2] == ":"):
            return None
        if parts and not ignored("/".join(parts)):
            names.append("/".join(parts))
    return sorted(names)


def check_masks(fmt: str, f: IO[bytes], found: dict, labelled: bool) -> dict:
    """A segmentation dataset: npz `y` must be N×H×W masks (shape checked by check_npz); a zip holds
    images/ (+ masks/ in eval data). Returns {"images": count, "names": [...]} where the layout tells it."""
    if fmt == "npz" and labelled and "y" not in found:
        raise CheckError("eval_data_unlabelled", "segmentation eval_data needs masks: 'y' N×H×W (255 = ignore)")
    if fmt == "npz" and "y" in found and len(found["y"]) != 3:
        raise CheckError("invalid_masks", f"segmentation labels are masks N×H×W, got 'y' of shape {found['y']}",
                         {"shape": found["y"]})
    if fmt != "zip":
        return {}
    names = zip_names(f)
    if names is None:
        return {}
    layout = mask_layout(names)
    if labelled and layout.masks is None:
        raise CheckError("eval_data_unlabelled", "segmentation eval_data needs masks: masks/NAME.png beside "
                         "images/NAME.ext")
    return {"images": len(layout.images), "names": layout.images}


def check_dataset(f: IO[bytes], declared: str | None, masks: bool = False, labelled: bool = False,
                  box_labels: bool = False) -> dict:
    """`masks`: a segmentation job's dataset; `labelled`: its eval_data (masks required); `box_labels`: a
    detection job's eval_data (npz: box arrays required and checked). The result's `images` is the number
    of images when the headers tell it."""
    fmt = detect_format(f)
    if declared is not None and declared != fmt and not (declared == "zip" and fmt == "npz"):
        raise CheckError("format_mismatch", f"the dataset was declared {declared!r} but is {fmt!r}",
                         {"declared": declared, "detected": fmt})
    if fmt == "npz" and declared == "zip":  # read as a zip archive of .npy files: nothing to say
        return {"format": fmt}
    found = {"format": fmt, **(check_npz(f, box_labels) if fmt == "npz" else {})}
    return {**found, **(check_masks(fmt, f, found, labelled) if masks else {})}
