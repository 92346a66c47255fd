"""COCO JSON box labels in an image archive: read into the detection label form through the archive
machinery (zip, tar, tar.gz), categories mapped and reported, and every refusal with its code."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: tests.builders
from tests import builders as B  # noqa: E402
from worker.adaptation.data import archives as A  # noqa: E402
from worker.adaptation.data.archives import coco  # noqa: E402
from worker.adaptation.errors import AdaptationError  # noqa: E402

NAMES = [f"img_{i:03d}.png" for i in range(3)]


def open_set(path, **kw):
    return A.ArchiveImageSet(path, num_workers=0, **kw)


def refused(code: str, tmp_path, **kw) -> AdaptationError:
    path, _ = B.coco_archive(tmp_path / "d.zip", **kw)
    with pytest.raises(AdaptationError) as info:
        open_set(path)
    assert info.value.code == code, (info.value.code, info.value.message)
    return info.value


@pytest.mark.parametrize("fmt", ["zip", "tar", "tar.gz"])
def test_coco_boxes_become_xyxy_labels_over_the_sorted_images(tmp_path, fmt):
    path, _ = B.coco_archive(tmp_path / f"d.{fmt}", fmt)
    s = open_set(path)
    assert len(s) == 3 and s.names == [f"images/{n}" for n in NAMES]  # the JSON is not an image
    lab = s.labels
    assert set(lab) == {"boxes", "labels", "image_index"}
    assert lab["boxes"].dtype == np.float32 and lab["labels"].dtype == np.int64 and lab["image_index"].dtype == np.int64
    np.testing.assert_allclose(lab["boxes"], [[2, 3, 12, 11], [15, 10, 27.5, 19], [0, 0, 32, 24]])
    np.testing.assert_array_equal(lab["labels"], [1, 2, 1])        # label id = COCO category id
    np.testing.assert_array_equal(lab["image_index"], [0, 0, 2])   # image ids 100.. -> archive positions
    assert s.class_names == [None, "one", "two"]
    m = s.category_mapping
    assert m["source"] == "annotations.json" and "category_id" in m["rule"]
    assert m["categories"] == [{"category_id": 1, "name": "one", "label": 1, "boxes": 2},
                               {"category_id": 2, "name": "two", "label": 2, "boxes": 1}]
    np.testing.assert_array_equal(s.image_sizes, [[24, 32]] * 3)
    s.close()


def test_file_names_match_by_path_relative_to_the_json_and_crowd_is_left_out(tmp_path):
    doc = B.coco_document([f"images/{n}" for n in NAMES], [(24, 32)] * 3,
                          [(1, [1.0, 1.0, 4.0, 4.0], 2), (2, [5.0, 5.0, 3.0, 3.0], 1)])
    doc["annotations"][1]["iscrowd"] = 1
    path, _ = B.coco_archive(tmp_path / "d.zip", document=doc, json_name="ds/annotations/val.json",
                             folder="ds/images")
    s = open_set(path)
    np.testing.assert_array_equal(s.labels["image_index"], [1])
    assert any("crowd" in n for n in s.notes) and s.category_mapping["source"] == "ds/annotations/val.json"


def test_an_image_without_boxes_is_listed_with_no_annotations(tmp_path):
    path, _ = B.coco_archive(tmp_path / "d.zip", boxes=[])
    s = open_set(path)
    assert s.labels["boxes"].shape == (0, 4) and s.labels["image_index"].shape == (0,)


def test_box_overhanging_by_less_than_a_pixel_is_clipped(tmp_path):
    path, _ = B.coco_archive(tmp_path / "d.zip", boxes=[(0, [-0.4, 1.0, 32.6, 5.0], 1)])
    np.testing.assert_allclose(open_set(path).labels["boxes"], [[0, 1, 32, 6]])


def test_box_out_of_the_image(tmp_path):
    err = refused("box_out_of_image", tmp_path, boxes=[(0, [1.0, 1.0, 4.0, 4.0], 1), (1, [20.0, 2.0, 20.0, 5.0], 1)])
    assert err.detail["annotation"] == 1 and err.detail["width"] == 32 and err.detail["image_index"] == 1


@pytest.mark.parametrize("wh", [[0.0, 4.0], [4.0, -2.0]])
def test_zero_or_negative_size(tmp_path, wh):
    err = refused("invalid_box", tmp_path, boxes=[(0, [1.0, 1.0, *wh], 1)])
    assert err.detail["annotation"] == 0


def test_unknown_category(tmp_path):
    err = refused("unknown_category", tmp_path, boxes=[(0, [1.0, 1.0, 4.0, 4.0], 7)])
    assert err.detail["category_id"] == 7 and err.detail["categories"] == [1, 2]


def test_annotation_for_an_image_not_in_the_archive(tmp_path):
    doc = B.coco_document([*NAMES, "gone.png"], [(24, 32)] * 4, [(3, [1.0, 1.0, 4.0, 4.0], 1)])
    err = refused("annotation_image_missing", tmp_path, document=doc)
    assert err.detail["file_name"] == "gone.png"
    doc = B.coco_document(NAMES, [(24, 32)] * 3, [])
    doc["annotations"] = [{"image_id": 999, "category_id": 1, "bbox": [1, 1, 2, 2]}]
    assert refused("annotation_image_missing", tmp_path, document=doc).detail["image_id"] == 999


def test_archive_image_the_json_does_not_list(tmp_path):
    doc = B.coco_document(NAMES[:2], [(24, 32)] * 2, [])
    assert refused("image_not_annotated", tmp_path, document=doc).detail["examples"] == ["images/img_002.png"]


def test_image_size_disagrees_with_the_json(tmp_path):
    doc = B.coco_document(NAMES, [(24, 32), (24, 32), (32, 24)], [])
    refused("annotation_image_size_mismatch", tmp_path, document=doc)


@pytest.mark.parametrize("text", [b"{not json", b"[]", b'{"images": [], "annotations": {}}',
                                  b'{"images": [{"id": "a", "file_name": "x.png"}], "annotations": [], '
                                  b'"categories": []}', b"[" * 100000 + b"]" * 100000])
def test_malformed_json(tmp_path, text):
    files = {f"images/{n}": B.encode_image(B.random_image()) for n in NAMES}
    files["annotations.json"] = text
    with pytest.raises(AdaptationError) as info:
        open_set(B.build_zip(tmp_path / "d.zip", files))
    assert info.value.code == "invalid_annotations", info.value.message


def test_bad_bbox_value(tmp_path):
    doc = B.coco_document(NAMES, [(24, 32)] * 3, [(0, [1.0, 1.0, 4.0, 4.0], 1)])
    doc["annotations"][0]["bbox"] = [1, 1, "4", 4]
    refused("invalid_annotations", tmp_path, document=doc)


def test_two_annotation_files_are_ambiguous(tmp_path):
    files = {f"images/{n}": B.encode_image(B.random_image()) for n in NAMES}
    files["a.json"] = files["b.json"] = json.dumps(B.coco_document(NAMES, [(8, 8)] * 3, [])).encode()
    with pytest.raises(AdaptationError) as info:
        open_set(B.build_zip(tmp_path / "d.zip", files))
    assert info.value.code == "ambiguous_annotations"


def test_annotation_file_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(coco, "MAX_ANNOTATION_BYTES", 100)
    refused("annotations_too_large", tmp_path)


def test_webdataset_sample_json_is_not_an_annotation_file(tmp_path):
    files = B.webdataset_files([B.encode_image(B.random_image(seed=i)) for i in range(2)], [0, 1],
                               extra={".json": b"{}"})
    s = open_set(B.build_tar(tmp_path / "w.tar", files))
    assert s.labels.tolist() == [0, 1] and s.category_mapping is None


def test_boxes_are_scaled_with_images_resized_to_one_size(tmp_path):
    names = ["a.png", "b.png"]
    doc = B.coco_document(names, [(20, 40), (10, 10)], [(0, [4.0, 2.0, 8.0, 6.0], 1), (1, [1.0, 1.0, 2.0, 2.0], 2)])
    files = {"a.png": B.encode_image(B.random_image(20, 40)), "b.png": B.encode_image(B.random_image(10, 10)),
             "annotations.json": json.dumps(doc).encode()}
    s = open_set(B.build_zip(tmp_path / "d.zip", files), preprocess_size=20)
    assert s.image_size == (20, 20)
    np.testing.assert_allclose(s.labels["boxes"], [[2, 2, 6, 8], [2, 2, 6, 6]])
    np.testing.assert_array_equal(s.image_sizes, [[20, 20], [20, 20]])


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_mixed_sizes_are_padded_for_detection_and_keep_their_coordinates(tmp_path, fmt):
    a, b = B.random_image(20, 40, seed=1), B.random_image(30, 10, seed=2)
    doc = B.coco_document(["a.png", "b.png"], [(20, 40), (30, 10)], [(1, [1.0, 20.0, 8.0, 9.5], 2)])
    files = {"a.png": B.encode_image(a), "b.png": B.encode_image(b), "annotations.json": json.dumps(doc).encode()}
    path = B.build_archive(tmp_path / f"d.{fmt}", files, fmt)
    with pytest.raises(AdaptationError) as info:
        open_set(path)
    assert info.value.code == "mixed_image_sizes"
    s = open_set(path, pad_mixed_sizes=True)
    assert s.image_size == (30, 40) and any("padded" in n for n in s.notes)
    np.testing.assert_array_equal(s.image_sizes, [[20, 40], [30, 10]])
    x = next(iter(s.batches(2)))[0].numpy()
    np.testing.assert_array_equal(x[0, :20], a)
    np.testing.assert_array_equal(x[1, :, :10], b)
    assert not x[0, 20:].any() and not x[1, :, 10:].any()
    np.testing.assert_allclose(s.labels["boxes"], [[1, 20, 9, 29.5]])  # unchanged: the image is not moved
