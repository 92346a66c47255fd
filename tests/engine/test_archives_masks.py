"""Segmentation archives: `images/NAME.ext` + `masks/NAME.png` (L or palette PNG: value = class, 255 =
ignore) through the archive reader, every refusal with its code, and the layout shared with the API."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: tests.builders
from tests import builders as B  # noqa: E402
from worker.adaptation.data import archives as A  # noqa: E402
from worker.adaptation.data.images import open_image_set  # noqa: E402
from worker.adaptation.errors import AdaptationError  # noqa: E402
from worker.adaptation.tasks import get_task  # noqa: E402

torch.set_num_threads(1)


def open_masks(path, **kw):
    return A.ArchiveImageSet(path, num_workers=0, masks=True, **kw)


def refused(code: str, path, **kw) -> AdaptationError:
    with pytest.raises(AdaptationError) as info:
        open_masks(path, **kw)
    assert info.value.code == code, (info.value.code, info.value.message)
    return info.value


@pytest.mark.parametrize("fmt", ["zip", "tar", "tar.gz"])
@pytest.mark.parametrize("mask_mode", ["L", "P"])
def test_images_and_masks(tmp_path, fmt, mask_mode):
    files, images, masks = B.segmentation_files(n=5, mask_mode=mask_mode, wrapper="set")
    s = open_masks(B.build_archive(tmp_path / f"seg.{fmt}", files, fmt))
    assert len(s) == 5 and s.names[0] == "set/images/s_000.png"
    assert s.labels.dtype == np.uint8 and s.labels.shape == (5, 8, 8)
    np.testing.assert_array_equal(s.labels, masks)  # palette indices, not the palette's colours
    x, idx = next(iter(s.batches(5)))
    np.testing.assert_array_equal(x.numpy(), images)
    get_task("segmentation").check_labels(s.labels, 3)
    s.close()


def test_images_alone_are_unlabelled_target_data(tmp_path):
    files, _, _ = B.segmentation_files(n=3, masks=False)
    s = open_masks(B.build_zip(tmp_path / "t.zip", files))
    assert len(s) == 3 and s.labels is None
    flat = {name.split("/")[-1]: data for name, data in files.items()}
    assert open_masks(B.build_zip(tmp_path / "flat.zip", flat)).labels is None


def test_open_image_set_passes_masks_through(tmp_path):
    files, _, masks = B.segmentation_files(n=2)
    path = B.build_zip(tmp_path / "s.zip", files)
    np.testing.assert_array_equal(open_image_set(path, masks=True, num_workers=0).labels, masks)
    classes = open_image_set(path, num_workers=0)  # a classification job reads two class folders
    assert classes.class_names == ["images", "masks"]


def test_masks_follow_their_image_when_sizes_are_resized(tmp_path):
    files, _, _ = B.segmentation_files(n=1, size=(8, 8))
    more, _, _ = B.segmentation_files(n=1, size=(4, 6), seed=1)
    files.update({k.replace("s_000", "t_000"): v for k, v in more.items()})
    s = open_masks(B.build_zip(tmp_path / "mixed.zip", files), preprocess_size=8)
    assert s.labels.shape == (2, 8, 8)
    assert set(np.unique(s.labels[1])) <= {0, 1, 2, 255}  # nearest: no class appears that was not there


def test_missing_mask(tmp_path):
    files, _, _ = B.segmentation_files(n=3)
    del files["masks/s_001.png"]
    err = refused("missing_mask", B.build_zip(tmp_path / "m.zip", files))
    assert err.detail["examples"] == ["images/s_001.png"]


def test_mask_without_image(tmp_path):
    files, _, _ = B.segmentation_files(n=3)
    del files["images/s_002.png"]
    assert refused("mask_without_image", B.build_zip(tmp_path / "o.zip", files)).detail["examples"] == [
        "masks/s_002.png"]


def test_mask_size_mismatch(tmp_path):
    files, _, _ = B.segmentation_files(n=2)
    files["masks/s_001.png"] = B.encode_mask(np.zeros((8, 7), np.uint8))
    err = refused("mask_size_mismatch", B.build_zip(tmp_path / "s.zip", files))
    assert err.detail == {"entry": "masks/s_001.png", "mask": [7, 8], "image": [8, 8]}


def test_colour_masks_are_refused(tmp_path):
    files, _, _ = B.segmentation_files(n=2)
    files["masks/s_000.png"] = B.encode_mask(np.zeros((8, 8), np.uint8), "RGB")
    assert refused("mask_not_indexed", B.build_tar(tmp_path / "c.tar", files)).detail["mode"] == "RGB"


def test_masks_must_be_png(tmp_path):
    files, _, _ = B.segmentation_files(n=1)
    files["masks/s_000.jpg"] = files.pop("masks/s_000.png")
    refused("invalid_mask", B.build_zip(tmp_path / "j.zip", files))
    files, _, _ = B.segmentation_files(n=1)
    files["masks/s_000.png"] = B.encode_image(np.zeros((8, 8, 3), np.uint8), "JPEG")  # a JPEG named .png
    refused("invalid_mask", B.build_zip(tmp_path / "j2.zip", files))


def test_stray_folders_are_refused(tmp_path):
    files, _, _ = B.segmentation_files(n=1)
    files["labels/s_000.png"] = files["masks/s_000.png"]
    assert refused("invalid_archive_layout", B.build_zip(tmp_path / "x.zip", files)).detail["examples"] == [
        "labels/s_000.png"]


def test_label_out_of_range_is_refused_by_the_task(tmp_path):
    files, _, _ = B.segmentation_files(n=2, num_classes=3)
    files["masks/s_001.png"] = B.encode_mask(np.full((8, 8), 7, np.uint8), "P")
    s = open_masks(B.build_zip(tmp_path / "r.zip", files))
    with pytest.raises(AdaptationError) as err:
        get_task("segmentation").check_labels(s.labels, 3)
    assert err.value.code == "label_out_of_range" and err.value.detail["found"] == [7]


def test_mask_pixel_limit_is_checked_before_decoding(tmp_path):
    files, _, _ = B.segmentation_files(n=1, size=(8, 8))
    refused("image_too_large", B.build_zip(tmp_path / "b.zip", files), max_pixels=63)  # the image's header
    big = {"images/a.png": B.encode_image(np.zeros((4, 4, 3), np.uint8)),
           "masks/a.png": B.encode_mask(np.zeros((64, 64), np.uint8))}
    refused("image_too_large", B.build_zip(tmp_path / "bm.zip", big), max_pixels=1000)  # the mask's header


def test_mask_zip_bomb_is_refused_while_listing(tmp_path):
    """A mask entry expanding far past its compressed size is refused by the archive limits, unread."""
    files, _, _ = B.segmentation_files(n=1)
    files["masks/s_000.png"] = b"\x89PNG\r\n\x1a\n" + b"\0" * (4 << 20)
    refused("archive_compression_ratio", B.build_zip(tmp_path / "bomb.zip", files))
