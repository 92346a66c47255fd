"""One image's bytes -> pixels: header probing without decoding (size, channels), decoding to a uint8
H×W×C array, and a precise error code for bytes that are not an accepted image."""
from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

from ...errors import AdaptationError
from .limits import image_too_large

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
_OTHER_IMAGE_MAGIC = (  # recognised only to say "this image format is not accepted"
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"), (b"P1", "PNM"), (b"P2", "PNM"), (b"P3", "PNM"), (b"P4", "PNM"),
    (b"P5", "PNM"), (b"P6", "PNM"), (b"qoif", "QOI"),
)
_MODE_CHANNELS = {"1": 1, "L": 1, "LA": 1, "I": 1, "I;16": 1, "I;16B": 1, "I;16L": 1, "I;16N": 1, "F": 1,
                  "RGB": 3, "RGBX": 3, "RGBa": 3, "CMYK": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "PA": 3,
                  "RGBA": 4}
CHANNEL_MODE = {1: "L", 3: "RGB", 4: "RGBA"}


def probe_image(name: str, data: bytes, usize: int, read_full, max_pixels: int) -> tuple[int, int, int]:
    """Parse an image header without decoding pixels: (width, height, channels). `data` holds the
    entry's first bytes; `read_full()` returns all of them, for headers longer than that."""
    for attempt in range(2):
        try:
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as im:
                w, h = im.size
                c = _mode_channels(im)
            break
        except Image.DecompressionBombError as exc:
            raise AdaptationError("image_too_large", f"{name}: {exc}", {"entry": name}) from None
        except AdaptationError as exc:
            exc.detail.setdefault("entry", name)
            raise
        except Exception as exc:  # noqa: BLE001 - any parse failure is the input's fault
            if attempt == 0 and len(data) < usize:  # the header runs past the peeked bytes
                data = read_full()
                continue
            raise undecodable(name, data, exc) from None
    if w * h > max_pixels:
        raise image_too_large(name, (w, h), max_pixels)
    if w < 1 or h < 1:
        raise AdaptationError("not_an_image", f"{name} has no pixels ({w}×{h})", {"entry": name})
    return w, h, c


def decode_image(name: str, data: bytes, channels: int, max_pixels: int,
                 resize_to: tuple[int, int] | None) -> np.ndarray:
    """uint8 H×W×`channels`; resized (Pillow, bilinear) to `resize_to` = (width, height) when given."""
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as im:
            if resize_to is not None and im.format == "JPEG":
                im.draft(im.mode, resize_to)  # DCT-domain downscale: decodes big JPEGs faster
            im.load()
            if im.size[0] * im.size[1] > max_pixels:
                raise image_too_large(name, im.size, max_pixels)
            return _to_array(im, channels, resize_to)
    except AdaptationError:
        raise
    except Image.DecompressionBombError as exc:
        raise AdaptationError("image_too_large", f"{name}: {exc}", {"entry": name}) from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the input's fault
        raise undecodable(name, data, exc) from None


def _mode_channels(im: Image.Image) -> int:
    mode = im.mode
    if mode == "P":
        return 4 if "transparency" in im.info else 3
    try:
        return _MODE_CHANNELS[mode]
    except KeyError:
        raise AdaptationError("not_an_image", f"unsupported image mode {mode!r}", {"mode": mode}) from None


def _to_array(im: Image.Image, channels: int, resize_to: tuple[int, int] | None) -> np.ndarray:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grey: keep the top 8 bits
        a = np.asarray(im).astype(np.int64)
        im = Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8), "L")
    target = CHANNEL_MODE[channels]
    if im.mode != target:
        if im.mode == "LA" and target == "L":
            im = im.getchannel(0)
        else:
            im = im.convert(target)
    if resize_to is not None and im.size != resize_to:
        im = im.resize(resize_to, Image.Resampling.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def _sniff(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _looks_truncated(data: bytes, fmt: str) -> bool:
    if fmt == "PNG":
        return b"IEND" not in data[-16:]
    if fmt == "JPEG":
        return not data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if fmt == "WEBP":
        return len(data) < 12 or struct.unpack("<I", data[4:8])[0] + 8 > len(data)
    return False


def undecodable(name: str, data: bytes, exc: Exception) -> AdaptationError:
    fmt = _sniff(data)
    reason = f"{type(exc).__name__}: {str(exc)[:200]}"
    if fmt is not None:
        if "truncat" in str(exc).lower() or _looks_truncated(data, fmt):
            return AdaptationError("truncated_image", f"{name} is a truncated {fmt} file", {"entry": name,
                                   "format": fmt, "reason": reason})
        return AdaptationError("corrupt_image", f"{name} is a {fmt} file that cannot be decoded: {reason}",
                               {"entry": name, "format": fmt, "reason": reason})
    other = next((f for magic, f in _OTHER_IMAGE_MAGIC if data.startswith(magic)), None)
    if other is not None:
        return AdaptationError("unsupported_image_format", f"{name} is a {other} image; archives may hold PNG, "
                               "JPEG or WebP", {"entry": name, "format": other})
    return AdaptationError("not_an_image", f"{name} is not a PNG, JPEG or WebP image (__MACOSX/ and dotfiles are "
                           "ignored; anything else in the archive must be an image)", {"entry": name})


MASK_MODES = ("L", "P")  # one byte per pixel: the value (L) or the palette index (P) is the class


def decode_mask(name: str, data: bytes, image_size: tuple[int, int], max_pixels: int,
                resize_to: tuple[int, int] | None) -> np.ndarray:
    """A segmentation mask PNG -> uint8 H×W of class indices (255 = ignore): its L value or palette index,
    never a colour. `image_size` = (width, height) of its image, which the mask must match; resized
    (nearest, so no new class appears) to `resize_to` = (width, height) with its image."""
    try:
        with Image.open(io.BytesIO(data), formats=("PNG",)) as im:
            if im.size[0] * im.size[1] > max_pixels:  # checked on the header, before a pixel is inflated
                raise image_too_large(name, im.size, max_pixels)
            if im.mode not in MASK_MODES:
                raise AdaptationError("mask_not_indexed", f"{name} is a {im.mode} PNG; a mask is an L (grey value "
                                      "= class) or palette (index = class) PNG, 255 = ignore; convert colour masks "
                                      "to class indices first", {"entry": name, "mode": im.mode})
            if im.size != tuple(image_size):
                raise AdaptationError("mask_size_mismatch", f"{name} is {im.size[0]}×{im.size[1]}, its image "
                                      f"{image_size[0]}×{image_size[1]}", {"entry": name, "mask": list(im.size),
                                                                         "image": list(image_size)})
            im.load()
            if resize_to is not None and im.size != tuple(resize_to):
                im = im.resize(resize_to, Image.Resampling.NEAREST)
            return np.array(im, dtype=np.uint8)  # P: the indices, not the palette's colours
    except AdaptationError:
        raise
    except Image.DecompressionBombError as exc:
        raise AdaptationError("image_too_large", f"{name}: {exc}", {"entry": name}) from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the input's fault
        if _sniff(data) not in (None, "PNG"):
            raise AdaptationError("invalid_mask", f"{name} is a {_sniff(data)} file; masks are PNG (lossless)",
                                  {"entry": name}) from None
        raise undecodable(name, data, exc) from None
