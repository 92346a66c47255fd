"""The dataset format of a local file: app/checks/formats.py tells formats apart (the API's submit checks use
the same function); here its refusal becomes the failed job's error."""
from __future__ import annotations

from pathlib import Path

from app.checks import CheckError
from app.checks.formats import ARCHIVE_FORMATS, ARROW_SUFFIX, HF_MARKERS, is_hf_dataset_zip  # noqa: F401
from app.checks.formats import detect_format as _detect

from ..errors import AdaptationError


def detect_format(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return _detect(f)
    except CheckError as exc:
        raise AdaptationError(exc.code, exc.message, exc.detail) from None
