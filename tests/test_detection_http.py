"""Detection jobs through the HTTP API (PostgreSQL + Redis + a Celery worker): each method on a CPU-sized
torchvision FCOS over a tiny canvas set of scikit-learn's digits with a sensor shift keeps or beats the source
model's mAP50 and reports the stable detection keys; TITAN's history holds its variance split; a torchvision
detector checkpoint runs as-is with arch_kwargs reaching the builder; task/method/architecture mismatches are
refused at submit."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from app.client import ApiError
from worker.adaptation.models.loading import load_model

FAST = {"score_threshold": 0.5, "ema_keep": 0.99, "flip": False}  # see tests/engine/test_detection.py


@pytest.fixture(scope="module")
def det_uploads(pg_service, detection_assets):
    from app.client import Client

    a = detection_assets
    with Client(pg_service.url) as c:
        return {k: c.upload(a[f], kind=kind)["id"] for k, f, kind in
                [("model", "model", "model"), ("data", "target", "dataset"), ("eval", "eval", "dataset")]}


def _spec(ids, a, method, params=None, task="detection", architecture="fcos_small", epochs=1, **model):
    return {"task": task, "method": method, "params": params or {},
            "model": {"architecture": architecture, "num_classes": 11, "arch_kwargs": a["arch_kwargs"],
                      "upload_id": ids["model"], **model},
            "data": {"upload_id": ids["data"]}, "eval_data": {"upload_id": ids["eval"]},
            "options": {"batch_size": 16, "epochs": epochs, "seed": 0}}


@pytest.mark.parametrize("method,params", [
    ("source", {}), ("bn_adapt", {}), ("mean_teacher", {**FAST, "adapt_batch_norm": True}),
    ("titan", {**FAST, "adapt_batch_norm": True, "mc_passes": 2}),
    ("fixed_pseudo_labels", {"score_threshold": 0.5, "flip": False})])
def test_detection_job_over_http(pg_service, det_uploads, detection_assets, tmp_path, method, params):
    from app.client import Client

    a = detection_assets
    with Client(pg_service.url) as c:
        job = c.wait(c.submit(_spec(det_uploads, a, method, params))["id"], poll=0.2, timeout=300)
        assert job["status"] == "succeeded", (job["error"], pg_service.logs())
        m = job["metrics"]
        for key in ("map_before", "map_after", "map50_before", "map50_after", "entropy_before", "entropy_after",
                    "agreement_with_source", "detections_per_image_before", "detections_per_image_after",
                    "mean_score_before", "mean_score_after", "collapse_detected", "images_per_second"):
            assert key in m, key
        assert 0 <= m["map_before"] <= m["map50_before"] <= 1 and 0 <= m["map_after"] <= 1
        assert m["eval"]["after"]["per_class_ap"] and not m["collapse_detected"]
        if method == "source":
            assert m["map50_after"] == m["map50_before"] and m["agreement_with_source"] == 1.0
        else:
            assert m["map50_after"] >= m["map50_before"], m
        weights = c.download(job["id"], "model.safetensors", tmp_path / "adapted.safetensors")
        history = json.loads(c.download(job["id"], "history.json", tmp_path / "history.json").read_text())
    model, _ = load_model("fcos_small", 11, a["arch_kwargs"], weights)
    out = model.eval()(torch.zeros(1, 3, 32, 32))
    assert {"boxes", "scores", "labels"} <= set(out[0])
    if method in ("mean_teacher", "titan", "fixed_pseudo_labels"):
        assert all("pseudo_labels_per_image" in s for s in history["steps"])
    if method == "titan":
        split = history["variance_split"]
        assert len(split["per_image_variance"]) == 96 and split["easy"].count(True) == m["method_report"]["split"]["easy"]


def test_torchvision_detector_checkpoint_runs_with_its_arch_kwargs(pg_service, det_uploads, detection_assets,
                                                                   tmp_path):
    """torchvision's own fasterrcnn_mobilenet_v3_large_320_fpn state dict (built without weights: live
    BatchNorm2d) is accepted at submit and runs; min_size/max_size reach the builder."""
    from torchvision.models import detection

    from app.client import Client

    torch.manual_seed(0)
    tv = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=11)
    torch.save(tv.state_dict(), tmp_path / "tv.pt")
    with Client(pg_service.url) as c:
        ids = {**det_uploads, "model": c.upload(tmp_path / "tv.pt", kind="model")["id"]}
        spec = _spec(ids, detection_assets, "source", architecture="fasterrcnn_mobilenet_v3_large_320_fpn",
                     arch_kwargs={"min_size": 64, "max_size": 64, "rpn_post_nms_top_n_test": 5,
                                  "box_detections_per_img": 3, "box_score_thresh": 0.0})
        job = c.wait(c.submit(spec)["id"], poll=0.2, timeout=300)
    assert job["status"] == "succeeded", (job["error"], pg_service.logs())
    m = job["metrics"]
    assert m["map_before"] is not None and m["model_load"]["notes"]  # num_batches_tracked of frozen layers dropped
    assert m["target"]["before"]["all_detections_per_image"] == 3  # box_detections_per_img reached the builder


@pytest.mark.parametrize("change,field", [
    ({"method": "tent"}, "method"),                                  # a method without detection
    ({"task": "classification", "method": "source"}, "model.architecture"),  # a detection architecture
    ({"architecture": "resnet18"}, "model.architecture"),            # a classification architecture
])
def test_detection_mismatches_are_refused_at_submit(pg_service, det_uploads, detection_assets, change, field):
    from app.client import Client

    spec = _spec(det_uploads, detection_assets, change.get("method", "mean_teacher"),
                 task=change.get("task", "detection"), architecture=change.get("architecture", "fcos_small"))
    with Client(pg_service.url) as c, pytest.raises(ApiError) as err:
        c.submit(spec)
    assert err.value.status == 422 and err.value.code == "task_mismatch"
    assert err.value.detail["field"] == field


def test_a_bad_box_label_is_refused_at_submit_with_its_code(pg_service, det_uploads, detection_assets, tmp_path):
    """The worker's npz reader refuses it with the same code (tests/engine/test_detection.py); the API's
    torch-free check (app/checks/boxes.py, the same function) refuses it first."""
    from app.client import Client

    a = detection_assets
    boxes = a["boxes"].copy()
    boxes[0, 2] = 99.0  # beyond the 32 px image
    np.savez(tmp_path / "bad.npz", x=a["x"], boxes=boxes, labels=a["labels"], image_index=a["image_index"])
    with Client(pg_service.url) as c, pytest.raises(ApiError) as err:
        ids = {**det_uploads, "eval": c.upload(tmp_path / "bad.npz", kind="dataset")["id"]}
        c.submit(_spec(ids, a, "source"))
    assert err.value.status == 422 and err.value.code == "box_out_of_image", err.value
