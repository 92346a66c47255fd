"""A dataset upload's format and, for npz, its arrays' headers (dtype and shape, from each member's
first bytes), checked at submit the way the worker's reader would refuse them later."""
from __future__ import annotations

import ast
import struct
import zipfile
from typing import IO

from . import CheckError
from .formats import detect_format

NPY_MAGIC = b"\x93NUMPY"


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


def check_npz(f: IO[bytes]) -> dict:
    """{"x": shape, "y": shape?}; refuses what the worker's npz reader refuses."""
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
    out = {"x": list(x_shape)}
    if y is not None:
        descr, shape = y
        # One integer label per image (classification) or per pixel (segmentation masks): the task's own
        # check in the worker says which.
        if shape[:1] != (x_shape[0],) or descr.lstrip("|<>=")[:1] not in ("i", "u"):
            raise CheckError("invalid_dataset", f"'y' must hold integer labels for the {x_shape[0]} images, got "
                             f"{descr}{list(shape)}", {"dtype": descr, "shape": list(shape)})
        out["y"] = list(shape)
    return out


def check_dataset(f: IO[bytes], declared: str | None) -> dict:
    fmt = detect_format(f)
    if declared is not None and declared != fmt and not (declared == "zip" and fmt == "npz"):
        raise CheckError("format_mismatch", f"the dataset was declared {declared!r} but is {fmt!r}",
                         {"declared": declared, "detected": fmt})
    return {"format": fmt, **(check_npz(f) if fmt == "npz" and declared != "zip" else {})}
