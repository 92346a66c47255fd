"""Box labels of a detection set (tasks/detection.py states the interface): a dict of numpy arrays `boxes`
float32 M×4 xyxy in the image's pixels, `labels` int64 M, `image_index` int64 M. The npz reader takes them
from the members of those names (read without pickle); every reader checks them with the check the API runs
at submit (app/checks/boxes.py), so a refusal has the same code either way: `detection_labels_missing`,
`invalid_detection_labels` (dtypes, shapes, lengths, image indices), `invalid_box` (not finite, zero or
negative size), `box_out_of_image`. Label ids are checked against num_classes later, by the task
(`check_labels`)."""
from __future__ import annotations

import numpy as np

from app.checks import CheckError
from app.checks.boxes import BOX_KEYS, check_box_arrays

from ..errors import AdaptationError

__all__ = ["BOX_KEYS", "checked"]


def checked(arrays: dict, sizes: np.ndarray) -> dict:
    """The three arrays typed (float32, int64, int64), boxes clipped to their image within the tolerance,
    or AdaptationError. `sizes`: N×2 (H, W) of the images in stored order."""
    missing = [k for k in BOX_KEYS if k not in arrays]
    if missing:
        raise AdaptationError("detection_labels_missing", f"box labels need {', '.join(BOX_KEYS)}; missing "
                              f"{missing}", {"missing": missing})
    try:
        return check_box_arrays(*(np.asarray(arrays[k]) for k in BOX_KEYS), len(sizes), sizes[:, 0], sizes[:, 1])
    except CheckError as exc:
        raise AdaptationError(exc.code, exc.message, exc.detail) from None
