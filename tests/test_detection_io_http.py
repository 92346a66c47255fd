"""Detection data and views through the real service (embedded: API + worker): a detector checkpoint and a
COCO JSON eval archive uploaded by `adaptd submit --task detection --watch` (mAP printed before → after, the
category mapping in the metrics, boxes in examples.json), an npz eval set's box refusals at submit (422), a
COCO archive's refusal as a failed job with its code, and the detection view in headless Chromium on the
finished job (mAP cards, AP per class, boxes drawn over the examples, layers toggled)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from app.client import ApiError, Client
from tests import builders as B
from tests.ux_helpers import Chromium, adaptd, cli_env, png_stats

pytestmark = pytest.mark.slow
ARCH, NUM_CLASSES = "fcos_small", 11   # conftest's detection_assets
NAMES = {1 + d: f"digit {d}" for d in range(10)}   # COCO category id = model label id = 1 + digit


def coco_zip(path, x: np.ndarray, boxes: np.ndarray, labels: np.ndarray, image_index: np.ndarray,
             categories: dict[int, str] = NAMES):
    names = [f"img_{i:03d}.png" for i in range(len(x))]
    doc = B.coco_document(names, [x.shape[1:3]] * len(x),
                          [(int(i), [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])], int(c))
                           for b, c, i in zip(boxes, labels, image_index)], categories)
    files = {f"val/{n}": B.encode_image(x[i]) for i, n in enumerate(names)}
    files["annotations/instances_val.json"] = json.dumps(doc).encode()
    return B.build_zip(path, files)


@pytest.fixture(scope="module")
def det_files(detection_assets, tmp_path_factory):
    """The session's CPU-sized detector and shifted target set (conftest), with its boxes as a COCO zip."""
    a = detection_assets
    truth = {k: a[k] for k in ("boxes", "labels", "image_index")}
    root = tmp_path_factory.mktemp("det-io")
    coco_zip(root / "coco.zip", a["x"], **truth)
    return {"root": root, "model": a["model"], "target": a["target"], "x": a["x"], "truth": truth,
            "arch_kwargs": a["arch_kwargs"]}


def _spec(ups: dict, arch_kwargs: dict, **extra) -> dict:
    return {"task": "detection", "method": "source",
            "model": {"upload_id": ups["model"], "architecture": ARCH, "num_classes": NUM_CLASSES,
                      "arch_kwargs": arch_kwargs},
            "data": {"upload_id": ups["data"]}, "options": {"batch_size": 8, "seed": 0}, **extra}


@pytest.fixture(scope="module")
def det_job(embedded_service, det_files):
    """`adaptd submit --task detection` with the COCO zip as eval data, watched to its end."""
    f = det_files
    r = adaptd("submit", "--url", embedded_service.url, "--task", "detection", "--method", "source",
               "--model", f["model"], "--arch", ARCH, "--num-classes", NUM_CLASSES,
               "--arch-kwargs", json.dumps(f["arch_kwargs"]), "--data", f["target"],
               "--eval-data", f["root"] / "coco.zip", "--batch-size", 8, "--watch", "--no-download",
               env=cli_env(), timeout=600)
    assert r.returncode == 0, (r.stdout, r.stderr, embedded_service.logs())
    job_id = re.search(r"submitted source job (\S+)", r.stderr).group(1)
    with Client(embedded_service.url) as c:
        return c.job(job_id), r.stdout + r.stderr


def test_cli_submits_a_coco_eval_archive_and_prints_map(det_job, det_files):
    job, out = det_job
    m = job["metrics"]
    assert job["spec"]["task"] == "detection" and job["status"] == "succeeded"
    for key in ("map_before", "map_after", "map50_before", "map50_after", "detections_per_image_after",
                "mean_score_after", "collapse_detected"):
        assert key in m, key
    assert 0 <= m["map_before"] <= 1 and m["map50_before"] >= m["map_before"]
    shown = f"{m['map_before']:.1%} -> {m['map_after']:.1%}"
    assert re.search(r"mAP\s+" + re.escape(shown), out), out
    assert f"mAP50 {m['map50_before']:.1%} -> {m['map50_after']:.1%}" in out
    mapping = m["eval"]["category_mapping"]
    assert mapping["source"] == "annotations/instances_val.json"
    used = sorted(set(det_files["truth"]["labels"].tolist()))
    assert [c["category_id"] for c in mapping["categories"]] == list(range(1, 11))
    assert all(c["label"] == c["category_id"] for c in mapping["categories"])
    assert sum(c["boxes"] for c in mapping["categories"]) == len(det_files["truth"]["labels"])
    assert m["eval"]["class_names"][1:] == [NAMES[k] for k in range(1, 11)] and used


def test_cli_job_list_and_status_show_map(embedded_service, det_job):
    job, _ = det_job
    m = job["metrics"]
    listing = adaptd("jobs", "--url", embedded_service.url, "--limit", "50")
    row = next(line for line in listing.stdout.splitlines() if line.startswith(job["id"][:8]))
    assert f"mAP {m['map_before']:.1%}->{m['map_after']:.1%}" in row
    status = adaptd("status", job["id"][:8], "--url", embedded_service.url).stdout
    assert f"mAP50 {m['map50_before']:.1%} -> {m['map50_after']:.1%}" in status and "detections per image" in status


def test_npz_box_refusals_at_submit(embedded_service, det_files, tmp_path):
    x, truth, kw = det_files["x"], det_files["truth"], det_files["arch_kwargs"]
    with Client(embedded_service.url) as c:
        ups = {"model": c.upload(det_files["model"], "model")["id"], "data": c.upload(det_files["target"], "dataset")["id"]}
        bad_boxes = truth["boxes"].copy()
        bad_boxes[0, 2] = x.shape[2] + 5.0          # past the canvas' right edge
        flat = truth["boxes"].copy()
        flat[1, 3] = flat[1, 1]                     # zero height
        cases = {"y_only": ({"x": x, "y": np.zeros(len(x), np.int64)}, "detection_labels_missing"),
                 "outside": ({"x": x, **truth, "boxes": bad_boxes}, "box_out_of_image"),
                 "flat": ({"x": x, **truth, "boxes": flat}, "invalid_box"),
                 "index": ({"x": x, **truth, "image_index": truth["image_index"] + len(x)}, "invalid_detection_labels")}
        for name, (arrays, code) in cases.items():
            np.savez(tmp_path / f"{name}.npz", **arrays)
            with pytest.raises(ApiError) as refused:
                c.submit(_spec(ups, kw, eval_data={"upload_id": c.upload(tmp_path / f"{name}.npz", "dataset")["id"]}))
            assert refused.value.status == 422 and refused.value.code == code, (name, refused.value.code)
            assert refused.value.detail["field"] == "eval_data"
        np.savez(tmp_path / "good.npz", x=x, **truth)   # the same arrays, well-formed: accepted
        job = c.submit(_spec(ups, kw, eval_data={"upload_id": c.upload(tmp_path / "good.npz", "dataset")["id"]}))
        assert job["status"] == "queued"
        c.cancel(job["id"])


def test_coco_refusal_fails_the_job_with_its_code(embedded_service, det_files, tmp_path):
    x, truth = det_files["x"], det_files["truth"]
    bad = coco_zip(tmp_path / "bad.zip", x, truth["boxes"], truth["labels"], truth["image_index"],
                   categories={k: v for k, v in NAMES.items() if k != int(truth["labels"][0])})
    with Client(embedded_service.url) as c:
        job = c.submit(_spec({"model": c.upload(det_files["model"], "model")["id"],
                              "data": c.upload(det_files["target"], "dataset")["id"]}, det_files["arch_kwargs"],
                             eval_data={"upload_id": c.upload(bad, "dataset")["id"]}))
        job = c.wait(job["id"], poll=0.2, timeout=300)
    assert job["status"] == "failed" and job["error"]["code"] == "unknown_category", job["error"]
    assert job["error"]["detail"]["category_id"] == int(truth["labels"][0])


def test_detection_view_in_chromium(embedded_service, det_job, chromium, tmp_path):
    job, _ = det_job
    m = job["metrics"]
    with Client(embedded_service.url) as c:
        examples = json.loads(c.download(job["id"], "examples.json", tmp_path / "examples.json").read_text())
    assert examples["task"] == "detection" and examples["items"]
    browser = Chromium(chromium, height=2200)
    try:
        browser.open(f"{embedded_service.url}/#/jobs/{job['id']}")
        browser.wait_for("!!document.body && document.body.dataset.ready === '1'", 60)
        text = lambda i: browser.eval(f"document.getElementById('{i}').textContent")  # noqa: E731
        assert f"{100 * m['map_before']:.1f}% → {100 * m['map_after']:.1f}%" in text("map")
        assert f"{100 * m['map50_before']:.1f}% → {100 * m['map50_after']:.1f}%" in text("map50")
        assert f"{m['detections_per_image_before']:.2f} → {m['detections_per_image_after']:.2f}" in text("det-per-image")
        assert "no collapse detected" in text("class-entropy")
        # AP per class: one bar per class with a value, before and after, named by the COCO categories
        ap = m["eval"]["before"]["per_class_ap"]
        bars = browser.eval("[...document.querySelectorAll('#det-ap-chart rect.bar')].map(r => r.dataset.category)")
        scored = sum(v is not None for v in ap.values())
        assert len(bars) == scored + sum(v is not None for v in m["eval"]["after"]["per_class_ap"].values())
        assert set(bars) <= set(NAMES.values())
        # every example: the boxes examples.json holds, drawn over the thumbnail, per layer
        for side in ("before", "after", "truth"):
            drawn = browser.eval(f"[...document.querySelectorAll('#det-examples figure')].map(f => "
                                 f"f.querySelectorAll('g.det-{side} rect').length)")
            assert drawn == [len(it[side]) for it in examples["items"]], side
        assert sum(len(it["truth"]) for it in examples["items"]) > 0
        assert browser.eval("document.querySelectorAll('#det-mapping tr').length") == 11
        # each layer toggles: the ground truth off (the others stay), then on again
        toggle = "document.querySelector('.det-toggles input[data-side=truth]').click()"
        shown = "getComputedStyle(document.querySelector('g.det-{}')).display !== 'none'"
        browser.eval(toggle)
        assert not browser.eval(shown.format("truth")) and browser.eval(shown.format("after"))
        browser.eval(toggle)
        assert browser.eval(shown.format("truth"))
        browser.eval("document.getElementById('det-examples').scrollIntoView()")
        shot = browser.screenshot(tmp_path / "detection-job.png")
        size, stddev, colours = png_stats(shot)
        assert stddev > 15 and colours > 100, (stddev, colours)
        print(f"\ndetection dashboard screenshot: {shot}")
    finally:
        browser.close()
