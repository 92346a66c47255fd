"""A detection job's eval_data npz is checked at submit, torch-free (app/checks/datasets.py, boxes.py):
keys, dtypes, shapes, lengths, box sizes and image bounds, each refusal with its own code."""
from __future__ import annotations

import io

import numpy as np
import pytest

from app.checks import CheckError
from app.checks.datasets import check_dataset

X = np.zeros((3, 24, 32, 3), np.uint8)   # 3 images, 24 high, 32 wide
GOOD = {"boxes": np.array([[2, 3, 12, 11], [15, 10, 27.5, 19], [0, 0, 32, 24]], np.float32),
        "labels": np.array([1, 2, 1], np.int64), "image_index": np.array([0, 0, 2], np.int64)}


def npz(**arrays) -> io.BytesIO:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    buf.seek(0)
    return buf


def refused(arrays: dict, code: str) -> CheckError:
    with pytest.raises(CheckError) as info:
        check_dataset(npz(**arrays), None, box_labels=True)
    assert info.value.code == code, (info.value.code, info.value.message)
    return info.value


def test_good_box_labels_pass():
    assert check_dataset(npz(x=X, **GOOD), None, box_labels=True) == {"format": "npz", "x": [3, 24, 32, 3],
                                                                       "images": 3, "boxes": 3}
    empty = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64),
             "image_index": np.zeros(0, np.int64)}
    assert check_dataset(npz(x=X, **empty), None, box_labels=True)["boxes"] == 0
    # Target data of a detection job (not eval_data) needs no boxes.
    assert "boxes" not in check_dataset(npz(x=X), None)


def test_classification_labels_for_a_detection_job():
    err = refused({"x": X, "y": np.zeros(3, np.int64)}, "detection_labels_missing")
    assert "'y'" in err.message and "boxes" in err.message
    err = refused({"x": X, "boxes": GOOD["boxes"], "labels": GOOD["labels"]}, "detection_labels_missing")
    assert err.detail["missing"] == ["image_index"]


@pytest.mark.parametrize("change, field", [
    ({"boxes": GOOD["boxes"][:, :3]}, "boxes"),                       # M×3
    ({"boxes": GOOD["boxes"].reshape(-1)}, "boxes"),                  # flat
    ({"labels": GOOD["labels"].astype(np.float32)}, "labels"),        # float labels
    ({"image_index": GOOD["image_index"][:2]}, None),                 # lengths disagree
    ({"image_index": np.array([0, 0, 3])}, None),                     # image 3 of 3
    ({"image_index": np.array([0, -1, 2])}, None),
    ({"labels": np.array([1, -2, 1])}, None),
    ({"boxes": np.array(["a", "b", "c"])}, "boxes"),                  # strings
])
def test_malformed_box_arrays(change, field):
    err = refused({"x": X, **GOOD, **change}, "invalid_detection_labels")
    if field:
        assert err.detail["array"] == field


@pytest.mark.parametrize("box", [[5, 5, 5, 9], [5, 9, 8, 4], [np.nan, 1, 2, 3]])
def test_zero_negative_or_nan_size(box):
    boxes = GOOD["boxes"].copy()
    boxes[1] = box
    err = refused({"x": X, **GOOD, "boxes": boxes}, "invalid_box")
    assert err.detail["box"] == 1


@pytest.mark.parametrize("box", [[20, 2, 40, 5], [-3, 0, 5, 5], [0, 0, 5, 26]])
def test_box_out_of_the_image(box):
    boxes = GOOD["boxes"].copy()
    boxes[2] = box
    err = refused({"x": X, **GOOD, "boxes": boxes}, "box_out_of_image")
    assert err.detail == {**err.detail, "box": 2, "image_index": 2, "width": 32, "height": 24}
