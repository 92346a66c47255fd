"""Segmentation jobs through the HTTP API (PostgreSQL + Redis + a Celery worker): each method on a small UNet
over a tiny canvas set of scikit-learn's real digits with a sensor shift beats the source model's mIoU; the
downloaded weights reload; task/method/architecture mismatches and a missing prior are refused at submit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from app.client import ApiError
from app.demo_data import load_sklearn_digits
from worker.adaptation.canvases import NUM_CLASSES, make_canvases, noise_contrast, to_rgb
from worker.adaptation.data import Preprocess
from worker.adaptation.device import seed_everything
from worker.adaptation.models import build_model
from worker.adaptation.models.export import save_safetensors
from worker.adaptation.models.loading import load_model
from worker.adaptation.training import train_segmenter

PRE = {"size": 32, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3}
MODEL = {"architecture": "unet_small", "num_classes": NUM_CLASSES, "arch_kwargs": {"width": 8}}


@pytest.fixture(scope="module")
def seg_uploads(pg_service, tmp_path_factory):
    from app.client import Client

    torch.set_num_threads(1)
    x, y = load_sklearn_digits()
    src = make_canvases(x[:1000], y[:1000], 300, size=32, digit_size=12, seed=0)
    tgt = make_canvases(x[1000:], y[1000:], 96, size=32, digit_size=12, seed=1)
    seed_everything(0)
    model = train_segmenter(build_model("unet_small", NUM_CLASSES, width=8), to_rgb(src.x), src.masks,
                            Preprocess(**PRE), epochs=8, lr=3e-3)
    root = tmp_path_factory.mktemp("seg-http")
    save_safetensors(model, root / "model.safetensors")
    shifted = noise_contrast(to_rgb(tgt.x), seed=2)
    np.savez(root / "target.npz", x=shifted)
    np.savez(root / "eval.npz", x=shifted, y=tgt.masks)
    np.savez(root / "one.npz", x=shifted[:1])                    # idm: the one-shot target image
    np.savez(root / "source.npz", x=to_rgb(src.x), y=src.masks)  # idm: the labelled source pool
    with Client(pg_service.url) as c:
        ids = {k: c.upload(root / f, kind=kind)["id"] for k, f, kind in
               [("model", "model.safetensors", "model"), ("data", "target.npz", "dataset"),
                ("eval", "eval.npz", "dataset"), ("one", "one.npz", "dataset"), ("source", "source.npz", "dataset")]}
    prior = [float((src.masks == c).mean()) for c in range(NUM_CLASSES)]
    return ids, prior


def _spec(ids, method, params=None, task="segmentation", architecture="unet_small", epochs=1, data="data",
          source=None):
    spec = {"task": task, "method": method, "params": params or {},
            "model": {**MODEL, "architecture": architecture, "upload_id": ids["model"]},
            "data": {"upload_id": ids[data]}, "eval_data": {"upload_id": ids["eval"]},
            "preprocess": PRE, "options": {"batch_size": 32, "epochs": epochs, "seed": 0}}
    if source is not None:
        spec["source_data"] = {"upload_id": ids[source]}
    return spec


@pytest.mark.parametrize("method,params,epochs", [("source", {}, 1), ("bn_adapt", {}, 1), ("tent", {}, 1),
                                                  ("sfda_prior", {"lr": 1e-4}, 2), ("cotta", {}, 1),
                                                  ("idm", {}, 60)])
def test_segmentation_job_over_http(pg_service, seg_uploads, tmp_path, method, params, epochs):
    from app.client import Client

    ids, prior = seg_uploads
    if method == "sfda_prior":
        params = {**params, "class_ratio_prior": prior}
    one_shot = {"data": "one", "source": "source"} if method == "idm" else {}
    with Client(pg_service.url) as c:
        job = c.wait(c.submit(_spec(ids, method, params, epochs=epochs, **one_shot))["id"], poll=0.2, timeout=300)
        assert job["status"] == "succeeded", (job["error"], pg_service.logs())
        m = job["metrics"]
        for key in ("miou_before", "miou_after", "pixel_accuracy_before", "pixel_accuracy_after", "dice_before",
                    "dice_after", "entropy_before", "entropy_after", "agreement_with_source",
                    "class_proportions_before", "class_proportions_after", "collapse_detected"):
            assert key in m, key
        assert 0 <= m["miou_before"] <= 1 and 0 <= m["miou_after"] <= 1
        if method == "source":
            assert m["miou_after"] == m["miou_before"] and m["agreement_with_source"] == 1.0
        else:
            assert m["miou_after"] > m["miou_before"] + 0.01, m
        weights = c.download(job["id"], "model.safetensors", tmp_path / "adapted.safetensors")
    model, _ = load_model("unet_small", NUM_CLASSES, {"width": 8}, weights)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, NUM_CLASSES, 32, 32)


@pytest.mark.parametrize("change,field", [
    ({"method": "shot"}, "method"),                                  # a classification-only method
    ({"task": "classification"}, "model.architecture"),              # a segmentation architecture
    ({"architecture": "resnet18"}, "model.architecture"),            # a classification architecture
])
def test_task_mismatches_are_refused_at_submit(pg_service, seg_uploads, change, field):
    from app.client import Client

    ids, _ = seg_uploads
    spec = _spec(ids, change.get("method", "tent"), task=change.get("task", "segmentation"),
                 architecture=change.get("architecture", "unet_small"))
    with Client(pg_service.url) as c, pytest.raises(ApiError) as err:
        c.submit(spec)
    assert err.value.status == 422 and err.value.code == "task_mismatch"
    assert err.value.detail["field"] == field


def test_sfda_prior_needs_its_prior(pg_service, seg_uploads):
    from app.client import Client

    ids, _ = seg_uploads
    with Client(pg_service.url) as c, pytest.raises(ApiError) as err:
        c.submit(_spec(ids, "sfda_prior"))
    assert err.value.status == 422 and "class_ratio_prior" in str(err.value.detail)


@pytest.mark.parametrize("method,data,source,message", [
    ("idm", "one", None, "labelled source pool"),      # idm without its source pool
    ("idm", "data", "source", "params.shots"),         # the whole target set is not one shot
    ("tent", "data", "source", "does not use a source pool"),
])
def test_source_data_goes_with_the_methods_that_need_it(pg_service, seg_uploads, method, data, source, message):
    from app.client import Client

    ids, _ = seg_uploads
    with Client(pg_service.url) as c, pytest.raises(ApiError) as err:
        c.submit(_spec(ids, method, data=data, source=source))
    assert err.value.status == 422 and message in err.value.message, err.value.message
    assert err.value.detail["field"] in ("source_data", "data")


def test_the_catalogue_shows_task_defaults_and_the_source_pool(pg_service):
    from app.client import Client

    with Client(pg_service.url) as c:
        methods = {m["name"]: m for m in c.methods()}
    assert methods["idm"]["needs_source_data"] and not methods["cotta"]["needs_source_data"]
    assert methods["cotta"]["task_defaults"]["segmentation"]["head_lr_scale"] == 10.0
    assert methods["tent"]["task_defaults"]["segmentation"]["lr"] == 2.5e-4
