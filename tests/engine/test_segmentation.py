"""Segmentation through the runner on a small UNet trained on canvases of scikit-learn's real digits, with a
sensor shift as the target: each method beats the source model's mIoU, a forced mask collapse is rolled back
and recorded, masks are checked, and a torchvision segmentation checkpoint loads as-is."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from app.contract.catalog import CATALOG

from app.demo_data import load_sklearn_digits
from worker.adaptation import segmentation as S
from worker.adaptation.canvases import NUM_CLASSES, make_canvases, noise_contrast, to_rgb
from worker.adaptation.data import Preprocess
from worker.adaptation.collapse import CollapseGuard
from worker.adaptation.device import seed_everything
from worker.adaptation.errors import AdaptationError
from worker.adaptation.metrics import histogram_entropy
from worker.adaptation.models import build_model
from worker.adaptation.models.export import save_safetensors
from worker.adaptation.models.loading import load_model
from worker.adaptation.runner import RunRequest, run
from worker.adaptation.training import train_segmenter

PRE = dict(size=32, channels=3, mean=[0.5] * 3, std=[0.5] * 3)
MODEL = {"architecture": "unet_small", "num_classes": NUM_CLASSES, "arch_kwargs": {"width": 8}}


@pytest.fixture(scope="module")
def seg_files(tmp_path_factory):
    x, y = load_sklearn_digits()
    src = make_canvases(x[:1000], y[:1000], 400, size=32, digit_size=12, seed=0)
    tgt = make_canvases(x[1000:], y[1000:], 128, size=32, digit_size=12, seed=1)
    seed_everything(0)  # the initialisation too, so every session gets the same model
    model = train_segmenter(build_model("unet_small", NUM_CLASSES, width=8), to_rgb(src.x), src.masks,
                            Preprocess(**PRE), epochs=8, lr=3e-3)
    root = tmp_path_factory.mktemp("seg")
    save_safetensors(model, root / "model.safetensors")
    shifted = noise_contrast(to_rgb(tgt.x), seed=2)
    np.savez(root / "target.npz", x=shifted, y=tgt.masks)
    np.savez(root / "one.npz", x=shifted[:1])  # idm's one-shot target image
    np.savez(root / "source.npz", x=to_rgb(src.x), y=src.masks)  # idm's labelled source pool
    prior = [float((src.masks == c).mean()) for c in range(NUM_CLASSES)]  # one typical proportion per class
    return root, prior


def _run(root, method, params=None, epochs=1, data="target.npz", source=None):
    evaluated = data
    if method == "idm":  # one shot of the target; scored on the whole target set
        evaluated = "target.npz"
        if data == "target.npz" and source is None:
            data, source = "one.npz", "source.npz"
    return run(RunRequest.for_files(root / "model.safetensors", root / data, root / f"out-{method}",
                                    eval_path=root / evaluated, source_path=root / source if source else None,
                                    task="segmentation", method=method, params=params or {},
                                    model=MODEL, preprocess=PRE, options={"batch_size": 32, "epochs": epochs}))


@pytest.fixture(scope="module")
def source_miou(seg_files):
    root, _ = seg_files
    m = _run(root, "source").metrics
    assert m["miou_before"] == m["miou_after"]
    return m["miou_before"]


@pytest.mark.parametrize("method,params,epochs", [
    ("bn_adapt", {}, 1),
    ("tent", {}, 1),
    ("sfda_prior", {"lr": 1e-4}, 2),
    ("cotta", {}, 1),
    ("idm", {}, 60),
])
def test_each_method_beats_the_source_model(seg_files, source_miou, method, params, epochs):
    root, prior = seg_files
    if method == "sfda_prior":
        params = {**params, "class_ratio_prior": prior}
    m = _run(root, method, params, epochs).metrics
    assert m["miou_before"] == pytest.approx(source_miou)
    assert m["miou_after"] > source_miou + 0.01, (m["miou_after"], m["collapse"], m["method"], m["target"])
    assert not m["collapse_detected"]
    for key in ("pixel_accuracy_before", "pixel_accuracy_after", "dice_before", "dice_after", "entropy_before",
                "entropy_after", "agreement_with_source", "class_proportions_before", "class_proportions_after"):
        assert key in m, key
    assert len(m["eval"]["after"]["iou_per_class"]) == NUM_CLASSES
    assert sum(m["class_proportions_after"]) == pytest.approx(1.0)


SEGMENTATION_METHODS = sorted(n for n, info in CATALOG.items() if "segmentation" in info.tasks)


@pytest.mark.parametrize("name", SEGMENTATION_METHODS)
def test_each_segmentation_method_updates_only_what_it_declares_and_repeats(seg_files, name):
    """The method contract on a segmenter: parameters change only under the declared scope, and two runs
    under one seed give identical weights."""
    root, prior = seg_files
    info = CATALOG[name]
    params = {"class_ratio_prior": prior, "lr": 1e-4} if name == "sfda_prior" else {}
    epochs = 5 if name == "idm" else 1
    first = _run(root, name, params, epochs=epochs)
    second = _run(root, name, params, epochs=epochs)
    source = load_file(root / "model.safetensors")
    a, b = load_file(first.model_path), load_file(second.model_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    model = build_model("unet_small", NUM_CLASSES, width=8)
    params_names = {k for k, _ in model.named_parameters()}
    norm_affine = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)
                   for p in ("weight", "bias")}
    changed = {k for k in params_names if not torch.equal(a[k], source[k])}
    allowed = {"nothing": set(), "norm_affine": norm_affine, "all": params_names}[info.updates]
    assert changed <= allowed, sorted(changed - allowed)[:5]
    if info.updates != "nothing":
        assert changed, "an updating method changed nothing"


def test_the_guard_tells_mostly_background_masks_from_a_mask_collapse():
    """Healthy digit masks are mostly background, so their pixel histogram looks like a collapse to the guard's
    threshold; the guard watches per class the images whose mask holds it instead."""
    x, y = load_sklearn_digits()
    masks = torch.from_numpy(make_canvases(x, y, 64, size=32, digit_size=12, seed=3).masks).long()
    masks[masks == S.IGNORE_INDEX] = 0
    threshold = CollapseGuard(NUM_CLASSES, 0.25, source_entropy=10.0).threshold
    assert histogram_entropy(torch.bincount(masks.flatten(), minlength=NUM_CLASSES)) < threshold
    assert histogram_entropy(S.class_presence(masks, NUM_CLASSES)) > 2 * threshold
    background = torch.zeros_like(masks)
    assert histogram_entropy(S.class_presence(background, NUM_CLASSES)) == 0.0
    speckled = background.clone()
    speckled[:, 0, 0] = 3  # one pixel of a digit class in every canvas: still everything background
    assert S.class_presence(speckled, NUM_CLASSES).tolist() == [64] + [0] * (NUM_CLASSES - 1)


def test_a_forced_mask_collapse_is_rolled_back_and_recorded(seg_files, source_miou):
    root, _ = seg_files
    everything_background = [1.0] + [0.0] * (NUM_CLASSES - 1)
    # lr 3e-2, 4 epochs: at 3e-3 the run collapses on some CPUs and not on others (float order of the source
    # training); after 2 it paints background plus one digit class over every canvas, which a target holding
    # one digit class would also show (not a collapse, as for classes: CollapseGuard.threshold)
    m = _run(root, "sfda_prior", {"class_ratio_prior": everything_background, "lr": 3e-2}, 4).metrics
    assert m["collapse_detected"], m["collapse"]
    reasons = {e["reason"] for e in m["collapse"]["events"]}
    assert reasons & {"predicted_class_histogram_collapsed", "exported_model_collapsed"}
    assert m["miou_after"] >= source_miou - 0.02  # rolled back: not the all-background mask


def test_masks_must_match_their_images(seg_files):
    root, _ = seg_files
    with np.load(root / "target.npz") as f:
        np.savez(root / "bad.npz", x=f["x"], y=f["y"][:, :16, :16])
    with pytest.raises(AdaptationError) as err:
        _run(root, "source", data="bad.npz")
    assert err.value.code == "mask_size_mismatch"


def test_a_mask_value_beyond_the_classes_is_refused(seg_files):
    root, _ = seg_files
    with np.load(root / "target.npz") as f:
        y = f["y"].copy()
        y[0, 0, 0] = NUM_CLASSES + 3
        np.savez(root / "oob.npz", x=f["x"], y=y)
    with pytest.raises(AdaptationError) as err:
        _run(root, "source", data="oob.npz")
    assert err.value.code == "label_out_of_range"


def test_a_torchvision_segmentation_checkpoint_loads_as_is(tmp_path):
    from torchvision.models import segmentation

    torch.manual_seed(0)
    original = segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3).eval()
    torch.save(original.state_dict(), tmp_path / "lraspp.pt")
    model, report = load_model("lraspp_mobilenet_v3_large", 3, {}, tmp_path / "lraspp.pt")
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), original(x)["out"])
    assert report["tensors"] == len(original.state_dict())
    assert set(model.state_dict()) == set(original.state_dict())


def test_per_image_priors_need_one_row_per_target_image(seg_files):
    root, prior = seg_files
    with pytest.raises(AdaptationError) as err:
        _run(root, "sfda_prior", {"class_ratio_prior": [prior, prior, prior]})
    assert err.value.code == "invalid_params" and "one per target image" in err.value.message


def test_per_image_priors_from_tags(seg_files, source_miou):
    """The authors' setting: each image's prior is a typical size per class times the image's tags."""
    root, prior = seg_files
    with np.load(root / "target.npz") as f:
        masks = f["y"]
    tags = np.stack([(masks == c).any(axis=(1, 2)) for c in range(NUM_CLASSES)], 1).astype(float)
    rows = tags * np.asarray(prior)[None] * 10
    rows[:, 0] = 1 - rows[:, 1:].sum(1)
    m = _run(root, "sfda_prior", {"class_ratio_prior": rows.tolist(), "lr": 1e-4}, 2).metrics
    assert m["miou_after"] > source_miou + 0.01 and m["method_report"]["prior"] == "per_image"


def test_cotta_takes_its_segmentation_defaults_and_averages_scaled_views(seg_files):
    """The task's defaults (SGD 2.5e-4, head x10, no Nesterov, weight decay 5e-4, ap 0.9) fill what the job
    leaves out; a value the job gives wins; the shifted target is below ap, so every batch is averaged."""
    root, _ = seg_files
    m = _run(root, "cotta", {"lr": 1e-4}).metrics
    p = m["params"]
    assert (p["optimizer"], p["lr"], p["nesterov"], p["weight_decay"], p["head_lr_scale"], p["ap"]) == \
        ("sgd", 1e-4, False, 5e-4, 10.0, 0.9)
    report = m["method_report"]
    assert report["augmentation_averaged_batches"] == report["batches"] > 0


def test_idm_needs_its_source_pool_and_one_shot(seg_files):
    root, _ = seg_files
    with pytest.raises(AdaptationError) as err:
        _run(root, "idm", {}, 2, data="one.npz")
    assert err.value.code == "source_data_missing"
    with pytest.raises(AdaptationError) as err:  # the whole target set is not one shot
        _run(root, "idm", {}, 2, data="target.npz", source="source.npz")
    assert err.value.code == "invalid_params" and "shots" in err.value.message
    with pytest.raises(AdaptationError) as err:  # an unlabelled pool
        _run(root, "idm", {}, 2, data="one.npz", source="one.npz")
    assert err.value.code == "source_data_unlabelled"


def test_idm_exports_the_restyled_source_pools_statistics(seg_files):
    """By default the exported BatchNorm statistics are the source pool's in the target image's style: after
    the first convolution every pool image carries the target's channel means, so the first BatchNorm's
    running mean is the target image's (under the exported weights). Without restyling, frozen BatchNorm
    exports the source statistics unchanged."""
    root, _ = seg_files
    restyled = _run(root, "idm", {}, 3)
    model, _ = load_model("unet_small", NUM_CLASSES, {"width": 8}, restyled.model_path)
    model.eval()
    x = Preprocess(**PRE)(torch.from_numpy(np.load(root / "one.npz")["x"]), torch.device("cpu"))
    with torch.no_grad():
        target_mean = model.enc1[0](x).mean(dim=(0, 2, 3))
    assert torch.allclose(model.enc1[1].running_mean, target_mean, atol=1e-4)
    source = load_file(root / "model.safetensors")
    assert not torch.allclose(source["enc1.1.running_mean"], target_mean, atol=1e-2)  # the shift is visible there

    frozen = load_file(_run(root, "idm", {"restyled_statistics": False}, 3).model_path)
    stats = [k for k in source if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(frozen[k], source[k]) for k in stats)


def test_examples_show_masks_before_after_and_the_truth(seg_files):
    """examples.json for masks: the images whose mask changed most first, palette PNG masks at the
    thumbnail's size (255 transparent), per-image pixel accuracy; a few tens of KB at most."""
    import base64
    import io
    import json

    from PIL import Image

    root, _ = seg_files
    ex = _run(root, "bn_adapt").examples
    assert ex["kind"] == "masks" and ex["set"] == "eval" and len(ex["colours"]) == NUM_CLASSES
    items = ex["items"]
    assert 1 <= len(items) <= 6 and ex["changed"] > 0
    assert items[0]["changed"] == max(it["changed"] for it in items) > 0
    assert len(json.dumps(ex)) < 40_000

    def png(url):
        assert url.startswith("data:image/png;base64,")
        return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))

    with np.load(root / "target.npz") as f:
        truth = f["y"][items[0]["index"]]
    for it in items:
        image = png(it["image"])
        for mask in (it["before"]["mask"], it["after"]["mask"], it["label"]["mask"]):
            m = png(mask)
            assert m.mode == "P" and m.size == image.size
            assert len(m.getpalette()) <= 3 * (NUM_CLASSES + 1)  # K colours + one for ignored pixels
        assert 0 <= it["before"]["pixel_accuracy"] <= 1 and 0 <= it["after"]["pixel_accuracy"] <= 1
    label = png(items[0]["label"]["mask"])
    shown = np.asarray(label)
    assert label.info["transparency"] == NUM_CLASSES  # the ignored pixels' entry
    assert set(np.unique(shown)) == {NUM_CLASSES if v == 255 else v for v in np.unique(truth)}  # indices, not colours


def _archive(root, name, x, y=None):
    from tests import builders as B

    files = {f"images/{i:04d}.png": B.encode_image(x[i]) for i in range(len(x))}
    if y is not None:
        files.update({f"masks/{i:04d}.png": B.encode_mask(y[i], "P") for i in range(len(y))})
    return B.build_zip(root / name, files)


def test_an_archive_of_images_and_masks_scores_as_its_npz(seg_files, source_miou):
    root, _ = seg_files
    with np.load(root / "target.npz") as f:
        _archive(root, "target.zip", f["x"], f["y"])
    m = _run(root, "source", data="target.zip").metrics
    assert m["miou_before"] == pytest.approx(source_miou)


def test_a_prior_file_of_sizes_and_tags_is_the_prior_it_describes(seg_files):
    """params.prior_upload (a JSON of one size per class and per-image tags, rows named by image) runs as
    the same per-image rows given inline in stored order."""
    import dataclasses
    import json

    root, prior = seg_files
    with np.load(root / "target.npz") as f:
        masks = f["y"]
    tags = np.stack([(masks == c).any(axis=(1, 2)) for c in range(NUM_CLASSES)], 1).astype(int)
    sizes = [round(1024 * p, 3) for p in prior]
    n = len(tags)  # rows named by the npz index, in reverse: matched to the images by name
    (root / "prior.json").write_text(json.dumps({"sizes": sizes, "tags": tags[::-1].tolist(),
                                                 "images": [str(i) for i in reversed(range(n))]}))
    rows = tags * np.asarray(sizes)[None]
    inline = _run(root, "sfda_prior", {"class_ratio_prior": (rows / rows.sum(1, keepdims=True)).tolist(),
                                       "lr": 1e-4}).metrics
    req = RunRequest.for_files(root / "model.safetensors", root / "target.npz", root / "out-prior-file",
                               eval_path=root / "target.npz", task="segmentation", method="sfda_prior",
                               params={"prior_upload": "local-prior", "lr": 1e-4}, model=MODEL, preprocess=PRE,
                               options={"batch_size": 32, "epochs": 1})
    from_file = run(dataclasses.replace(req, param_files={"prior_upload": root / "prior.json"})).metrics
    assert from_file["miou_after"] == pytest.approx(inline["miou_after"], abs=1e-6)
    assert from_file["method_report"]["prior_mean"] == pytest.approx(inline["method_report"]["prior_mean"])
    (root / "prior.json").write_text(json.dumps({"sizes": sizes, "tags": tags[:5].tolist()}))
    with pytest.raises(AdaptationError) as err:
        run(dataclasses.replace(req, param_files={"prior_upload": root / "prior.json"}))
    assert err.value.code == "prior_shape_mismatch" and err.value.detail["rows"] == 5


def test_mask_examples_stay_within_their_byte_budget():
    """Photos compress far less than digit canvases: the gallery stops before it grows past its budget."""
    import json

    from worker.adaptation.data.images import ArrayImageSet
    from worker.adaptation.examples import MASK_BUDGET_BYTES, pick_masks

    rng = np.random.default_rng(0)
    data = ArrayImageSet(rng.integers(0, 256, (8, 256, 256, 3), dtype=np.uint8),
                         rng.integers(0, 3, (8, 256, 256), dtype=np.uint8))
    before = {"mask": torch.from_numpy(rng.integers(0, 3, (8, 64, 64), dtype=np.uint8))}
    after = {"mask": torch.zeros(8, 64, 64, dtype=torch.uint8)}
    ex = pick_masks(data, before, after, labelled=True, num_classes=3)
    assert 1 <= len(ex["items"]) < 6 and len(json.dumps(ex)) <= MASK_BUDGET_BYTES + 1000
    assert [it["image"][:22] for it in ex["items"]] == ["data:image/png;base64,"] * len(ex["items"])
