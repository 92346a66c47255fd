"""Detection examples (examples.json): thumbnails with boxes before/after/truth scaled to the thumbnail,
images whose detections changed most first, only confident detections."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from worker.adaptation.data.images import ArrayImageSet
from worker.adaptation import detection_examples
from worker.adaptation.detection_examples import THUMBNAIL_PX, changed_detections, pick


def det(boxes, scores, labels) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.long)}


def test_examples_scale_boxes_and_put_the_most_changed_first(monkeypatch):
    n = 10
    x = np.zeros((n, 200, 400, 3), np.uint8)  # wider than tall; smooth, as photos are (noise would not compress)
    x[..., 0] = np.linspace(0, 255, 400, dtype=np.uint8)
    x[:, 50:150, 100:300] = np.arange(n, dtype=np.uint8)[:, None, None, None] * 20
    truth = {"boxes": np.array([[40, 20, 120, 100], [200, 100, 400, 200]], np.float32),
             "labels": np.array([1, 2], np.int64), "image_index": np.array([7, 7], np.int64)}
    data = ArrayImageSet(x, truth)
    same = det([[10, 10, 50, 50]], [0.9], [1])
    before = [same for _ in range(n)]
    after = [same for _ in range(n)]
    after[7] = det([[40, 20, 120, 100], [200, 100, 400, 200], [0, 0, 4, 4]], [0.95, 0.8, 0.1], [1, 2, 3])  # +2 (+1 weak)
    after[3] = det([[10, 10, 50, 50]], [0.9], [2])                                     # relabelled: 2 unmatched
    after[5] = det([[10, 10, 50, 50], [300, 10, 350, 60]], [0.9, 0.7], [1, 1])           # one more
    np.testing.assert_array_equal(changed_detections(before, after, 0.5), [0, 0, 0, 2, 0, 1, 0, 3, 0, 0])

    ex = pick(data, before, after, labelled=True, threshold=0.5, count=6)
    json.dumps(ex)  # stored as JSON
    assert ex["task"] == "detection" and ex["set"] == "eval" and ex["changed"] == 3 and ex["score_threshold"] == 0.5
    idx = [it["index"] for it in ex["items"]]
    assert idx[:3] == [7, 3, 5] and len(idx) == 6 and len(set(idx)) == 6
    item = ex["items"][0]
    png = Image.open(io.BytesIO(base64.b64decode(item["image"].split(",", 1)[1])))
    assert png.size == (item["width"], item["height"]) == (THUMBNAIL_PX, THUMBNAIL_PX // 2)
    s = THUMBNAIL_PX / 400
    assert [b["box"] for b in item["after"]] == [pytest.approx([40 * s, 20 * s, 120 * s, 100 * s]),
                                                 pytest.approx([200 * s, 100 * s, 400 * s, 200 * s])]
    assert [b["score"] for b in item["after"]] == [0.95, 0.8]   # the 0.1 detection is not shown
    assert item["before"] == [{"box": pytest.approx([10 * s, 10 * s, 50 * s, 50 * s]), "label": 1, "score": 0.9}]
    assert [b["label"] for b in item["truth"]] == [1, 2] and "score" not in item["truth"][0]
    assert ex["items"][1]["truth"] == []                         # labelled, no boxes on that image

    monkeypatch.setattr(detection_examples, "BUDGET_BYTES", 1)  # the first item always, then none
    assert [it["index"] for it in pick(data, before, after, True, 0.5)["items"]] == [7]
    unlabelled = pick(ArrayImageSet(x), before, after, labelled=False, threshold=0.5)
    assert unlabelled["set"] == "target" and all(it["truth"] is None for it in unlabelled["items"])


def test_detection_job_over_a_coco_archive_of_two_image_sizes(tmp_path):
    """The runner pads an archive of several sizes for detection (no preprocess size), scores against the
    COCO boxes in their own pixels, reports the mapping, and shows each example without its padding."""
    from tests import builders as B
    from worker.adaptation.models import build_model
    from worker.adaptation.models.export import save_safetensors
    from worker.adaptation.runner import RunRequest, run

    torch.manual_seed(0)
    kwargs = {"width": 8, "min_size": 32, "max_size": 48}
    save_safetensors(build_model("fcos_small", 11, **kwargs), tmp_path / "model.safetensors")
    sizes = [(32, 32), (24, 40), (32, 32), (40, 24)]
    names = [f"{i}.png" for i in range(4)]
    doc = B.coco_document(names, sizes, [(0, [2.0, 2.0, 10.0, 12.0], 3), (1, [30.0, 4.0, 9.0, 15.0], 7),
                                         (3, [1.0, 25.0, 20.0, 14.0], 1)], {1: "a", 3: "b", 7: "c"})
    files = {n: B.encode_image(B.random_image(h, w, seed=i)) for i, (n, (h, w)) in enumerate(zip(names, sizes))}
    files["annotations.json"] = json.dumps(doc).encode()
    coco = B.build_zip(tmp_path / "coco.zip", files)
    req = RunRequest.for_files(tmp_path / "model.safetensors", coco, tmp_path / "out", coco, task="detection",
                               method="source", model={"architecture": "fcos_small", "num_classes": 11,
                                                       "arch_kwargs": kwargs}, options={"batch_size": 2})
    res = run(req)
    m = res.metrics
    assert m["eval"]["before"]["num_boxes"] == 3 and 0 <= m["map_before"] <= 1
    assert [c["category_id"] for c in m["eval"]["category_mapping"]["categories"]] == [1, 3, 7]
    assert m["eval"]["class_names"] == [None, "a", None, "b", None, None, None, "c"]
    items = {it["index"]: it for it in res.examples["items"]}
    assert [(items[i]["height"], items[i]["width"]) for i in range(4)] == sizes  # thumbnails without padding
    assert items[1]["truth"] == [{"box": [30.0, 4.0, 39.0, 19.0], "label": 7}]
