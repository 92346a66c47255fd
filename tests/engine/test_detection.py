"""Detection through the runner on a CPU-sized torchvision FCOS trained on canvases of scikit-learn's digits,
with a sensor shift as the target (tests/conftest.py: detection_assets): each method keeps or beats the
source model's mAP50, TITAN records its variance split, a forced collapse is rolled back and recorded, box
labels are refused precisely, and torchvision's own detector checkpoints load as-is."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from app.contract.catalog import get_method_info
from worker.adaptation.boxes import mean_average_precision
from worker.adaptation.errors import AdaptationError
from worker.adaptation.methods import _load_all  # noqa: F401  (registers every method)
from worker.adaptation.methods.base import MethodContext
from worker.adaptation.methods.registry import METHODS
from worker.adaptation.models import build_model
from worker.adaptation.models.loading import load_model
from worker.adaptation.runner import RunRequest, run

# FCOS's scores are √(class probability · centerness): on this small model the confident ones sit around
# 0.5-0.7, so simple-SFOD's 0.8 (tuned on Faster R-CNN) would keep no pseudo-label. A short job needs a
# teacher that moves (keep 0.99, not 0.9996), and digits must not be flipped.
FAST = {"score_threshold": 0.5, "ema_keep": 0.99, "flip": False}
DETECTION_METHODS = sorted(n for n in METHODS if "detection" in get_method_info(n).tasks)


def _model(a):
    return {"architecture": "fcos_small", "num_classes": a["num_classes"], "arch_kwargs": a["arch_kwargs"]}


def _run(a, tmp_path, method, params=None, epochs=1, eval_path=None, **spec):
    return run(RunRequest.for_files(a["model"], a["target"], tmp_path / method, eval_path=eval_path or a["eval"],
                                    task="detection", method=method, params=params or {}, model=_model(a),
                                    options={"batch_size": 16, "epochs": epochs}, **spec))


@pytest.fixture(scope="module")
def source_metrics(detection_assets, tmp_path_factory):
    return _run(detection_assets, tmp_path_factory.mktemp("src"), "source").metrics


def test_source_is_scored_with_coco_map_and_label_free_signals(source_metrics):
    m = source_metrics
    assert m["map_before"] == m["map_after"] and m["map50_before"] == m["map50_after"]
    assert 0.05 < m["map50_before"] < 0.6  # a real shift: the source model is weak, not blind
    assert 0 <= m["map_before"] <= m["map50_before"] <= 1
    assert set(m["eval"]["before"]["per_class_ap"]) <= {str(c) for c in range(1, 11)}
    assert m["detections_per_image_before"] > 0 and 0 < m["mean_score_before"] < 1
    assert m["agreement_with_source"] == 1.0 and m["collapse_detected"] is False
    counts = m["target"]["before"]["predicted_class_counts"]
    assert len(counts) == 11 and counts[0] == 0  # the digits' labels are 1..10


@pytest.mark.parametrize("method,params,epochs", [
    ("bn_adapt", {}, 1),
    ("mean_teacher", {**FAST, "adapt_batch_norm": True}, 2),
    ("titan", {**FAST, "adapt_batch_norm": True, "mc_passes": 4}, 2),
    ("fixed_pseudo_labels", {"score_threshold": 0.5, "flip": False}, 2),
])
def test_method_keeps_or_beats_the_source_map50(detection_assets, source_metrics, tmp_path, method, params, epochs):
    result = _run(detection_assets, tmp_path, method, params, epochs)
    m = result.metrics
    assert m["map50_before"] == source_metrics["map50_before"]
    assert m["map50_after"] >= m["map50_before"], (m["map50_before"], m["map50_after"])
    assert not m["collapse_detected"]
    # the exported model is the architecture's own: same keys (FrozenBatchNorm2d, no num_batches_tracked)
    state = load_file(str(result.model_path))
    assert set(state) == set(build_model("fcos_small", 11, **detection_assets["arch_kwargs"]).state_dict())
    if method != "bn_adapt":
        steps = result.history["steps"]
        assert len(steps) == epochs * 6 and all("pseudo_labels_per_image" in s for s in steps)
        assert m["method_report"]["pseudo_labels_per_image_mean"] > 0
    if method == "titan":
        split = result.history["variance_split"]
        assert len(split["per_image_variance"]) == len(split["easy"]) == 96
        assert split["easy"].count(True) == m["method_report"]["split"]["easy"]
        assert 40 <= m["method_report"]["split"]["easy"] <= 56  # split at the median (ties aside)
        easy_v = [v for v, e in zip(split["per_image_variance"], split["easy"]) if e]
        hard_v = [v for v, e in zip(split["per_image_variance"], split["easy"]) if not e]
        assert min(easy_v) >= max(hard_v)  # easy = the high-variance (source-similar) side
        assert "discriminator_loss" in result.history["steps"][0]


def test_exported_bn_adapted_detector_reloads_with_its_scores(detection_assets, tmp_path):
    a = detection_assets
    result = _run(a, tmp_path, "bn_adapt")
    model, _ = load_model("fcos_small", 11, a["arch_kwargs"], result.model_path)
    with torch.no_grad():
        preds = model.eval()(torch.from_numpy(a["x"]).permute(0, 3, 1, 2).float() / 255)
    scores = mean_average_precision(preds, {k: a[k] for k in ("boxes", "labels", "image_index")})
    assert scores["map50"] == pytest.approx(result.metrics["map50_after"], abs=1e-6)
    assert result.metrics["batchnorm_recalibration_batches"] > 0


def test_forced_collapse_is_rolled_back_and_recorded(detection_assets, tmp_path):
    """lr 1 and a teacher that follows at once: the loss diverges and the detections vanish; the guard rolls
    back and the job returns the source weights, saying so."""
    m = _run(detection_assets, tmp_path, "mean_teacher", {**FAST, "lr": 1.0, "ema_keep": 0.5}, 2).metrics
    assert m["collapse_detected"] is True
    reasons = {e["reason"] for e in m["collapse"]["events"]}
    assert reasons & {"loss_not_finite", "predicted_class_histogram_collapsed", "exported_model_collapsed"}
    assert m["map50_after"] >= m["map50_before"] - 1e-9  # what is exported is no worse than the source


def _eval_npz(a, tmp_path, **change):
    arrays = {"x": a["x"], "boxes": a["boxes"].copy(), "labels": a["labels"].copy(),
              "image_index": a["image_index"].copy()}
    for key, fn in change.items():
        arrays[key] = fn(arrays[key])
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


def _set(i, col, value):
    def fn(arr):
        arr[i, col] = value
        return arr
    return fn


@pytest.mark.parametrize("change,code", [
    ({"boxes": _set(0, 2, 40.0)}, "box_out_of_image"),        # beyond the 32 px image
    ({"boxes": _set(0, 0, 30.0)}, "invalid_box"),             # x1 > x2: negative size
    ({"boxes": _set(0, 1, np.nan)}, "invalid_box"),
    ({"image_index": lambda v: v + 1}, "invalid_detection_labels"),  # the last box points past the last image
    ({"labels": lambda v: v + 5}, "label_out_of_range"),       # 11.. with num_classes 11
    ({"labels": lambda v: v.astype(np.float32)}, "invalid_detection_labels"),
    ({"boxes": lambda v: v[:, :3]}, "invalid_detection_labels"),
])
def test_bad_box_labels_fail_the_job_precisely(detection_assets, tmp_path, change, code):
    path = _eval_npz(detection_assets, tmp_path, **change)
    with pytest.raises(AdaptationError) as err:
        _run(detection_assets, tmp_path, "source", eval_path=path)
    assert err.value.code == code


def test_a_resizing_or_normalising_preprocess_is_refused(detection_assets, tmp_path):
    with pytest.raises(AdaptationError) as err:
        _run(detection_assets, tmp_path, "source", preprocess={"size": 64})
    assert err.value.code == "invalid_preprocess"


@pytest.mark.parametrize("name", DETECTION_METHODS)
def test_detection_methods_update_what_they_declare_and_are_deterministic(detection_assets, name):
    """The method contract on a detector: `nothing` leaves every parameter as it was, `all` changes more
    than norm layers; two runs under one seed give the same exported weights."""
    from worker.adaptation.device import seed_everything

    a = detection_assets
    x = torch.from_numpy(a["x"][:32]).permute(0, 3, 1, 2).float() / 255
    source, _ = load_model("fcos_small", 11, a["arch_kwargs"], a["model"])
    info = get_method_info(name)
    params = {} if name in ("source", "bn_adapt") else {**FAST, "mc_passes": 2} if name == "titan" else \
        {k: v for k, v in FAST.items() if k != "ema_keep"} if name == "fixed_pseudo_labels" else FAST

    def drive():
        seed_everything(3)
        model = copy.deepcopy(source)

        def iterate():
            for i in range(0, 32, 16):
                yield x[i:i + 16], torch.arange(i, i + 16)

        ctx = MethodContext(num_classes=11, device=torch.device("cpu"), batch_size=16, epochs=1, dataset_size=32,
                            iterate_target=iterate, input_mean=(0.0,) * 3, input_std=(1.0,) * 3)
        method = METHODS[name](model, info.params_model.model_validate(params), ctx)
        method.begin_epoch(0)
        for xb, idx in iterate():
            method.adapt(xb, idx)
        return method

    before = {k: v.clone() for k, v in source.named_parameters()}
    m1, m2 = drive(), drive()
    # (bn_adapt's model holds BatchNorm2d where FrozenBatchNorm2d held buffers: parameters with new names)
    changed = {k for k, v in m1.model.named_parameters() if k in before and not torch.equal(before[k], v)}
    if info.updates == "nothing":
        assert not changed
    else:
        assert info.updates == "all" and any(k.startswith("head.") for k in changed) \
            and any(k.startswith("backbone.") for k in changed)
    e1, e2 = m1.export_model().state_dict(), m2.export_model().state_dict()
    assert e1.keys() == e2.keys() and all(torch.equal(e1[k], e2[k]) for k in e1)


@pytest.mark.parametrize("frozen", [False, True])
def test_torchvision_detector_checkpoint_loads_as_is(tmp_path, frozen):
    """A state dict of torchvision's own fasterrcnn_mobilenet_v3_large_320_fpn loads unchanged and computes
    what torchvision's model computes: as torchvision builds it without weights (live BatchNorm2d, with
    num_batches_tracked) and as its COCO checkpoints are (FrozenBatchNorm2d: no num_batches_tracked)."""
    from torchvision.models import detection

    torch.manual_seed(0)
    reference = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=5)
    for m in reference.modules():  # statistics that are not the identity, so a mix-up would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = reference.state_dict()
    if frozen:
        state = {k: v for k, v in state.items() if not (k.startswith("backbone.body") and
                                                        k.endswith("num_batches_tracked"))}
    torch.save(state, tmp_path / "tv.pt")
    model, report = load_model("fasterrcnn_mobilenet_v3_large_320_fpn", 5, {}, tmp_path / "tv.pt")
    assert report["tensors"] == len(state) - (0 if frozen else
                                              sum(k.endswith("num_batches_tracked") and k.startswith("backbone.body")
                                                  for k in state))
    x = torch.rand(2, 3, 96, 128)
    reference.eval()
    model.eval()
    with torch.no_grad():
        ref_feats = reference.backbone(reference.transform(list(x))[0].tensors)
        feats = model.backbone(model.transform(list(x))[0].tensors)
    for k in ref_feats:
        torch.testing.assert_close(feats[k], ref_feats[k], rtol=1e-4, atol=1e-5)
