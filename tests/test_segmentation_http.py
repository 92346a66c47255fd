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
    np.savez(root / "target-masks.npz", y=tgt.masks)  # for the archive and prior files of the tests below
    return ids, prior, root


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

    ids, prior, _ = seg_uploads
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

    ids, _, _ = seg_uploads
    spec = _spec(ids, change.get("method", "tent"), task=change.get("task", "segmentation"),
                 architecture=change.get("architecture", "unet_small"))
    with Client(pg_service.url) as c, pytest.raises(ApiError) as err:
        c.submit(spec)
    assert err.value.status == 422 and err.value.code == "task_mismatch"
    assert err.value.detail["field"] == field


def test_sfda_prior_needs_its_prior(pg_service, seg_uploads):
    from app.client import Client

    ids, _, _ = seg_uploads
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

    ids, _, _ = seg_uploads
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


# --- archives, prior files and the CLI ----------------------------------------------------------------

CLASS_NAMES = ["background", *(f"digit{d}" for d in range(10))]


def _mask_archive(root, name, x, y=None, drop=()):
    from tests import builders as B

    files = {f"canvases/images/c{i:03d}.png": B.encode_image(x[i]) for i in range(len(x))}
    if y is not None:
        files.update({f"canvases/masks/c{i:03d}.png": B.encode_mask(y[i], "P") for i in range(len(y)) if i not in drop})
    return B.build_zip(root / name, files)


def _prior_csv(root, masks, prior, name="prior.csv") -> "Path":
    """Bateson's estimate: a typical size per class (pixels) times each image's tags (class present or not),
    one row per image named in its `image` column, in reverse order (rows are matched by name)."""
    sizes = [f"{1024 * p:.2f}" for p in prior]
    lines = [",".join(["image", *CLASS_NAMES, *(f"tag:{c}" for c in CLASS_NAMES)])]
    for i, m in reversed(list(enumerate(masks))):
        tags = ["1" if (m == c).any() else "0" for c in range(NUM_CLASSES)]
        lines.append(",".join([f"c{i:03d}.png", *sizes, *tags]))
    (root / name).write_text("\n".join(lines) + "\n")
    return root / name


@pytest.fixture(scope="module")
def cli_prior_job(pg_service, seg_uploads):
    """`adaptd submit --task segmentation --prior prior.csv --watch` on archives of images + masks: the CLI
    uploads the prior (kind prior) and prints mIoU before -> after. One real job, shared with the dashboard."""
    from tests.ux_helpers import adaptd

    _, prior, root = seg_uploads
    with np.load(root / "eval.npz") as f:
        x, y = f["x"], f["y"]
    _mask_archive(root, "target.zip", x)
    _mask_archive(root, "eval.zip", x, y)
    csv = _prior_csv(root, y, prior)
    r = adaptd("submit", "--task", "segmentation", "--method", "sfda_prior", "--prior", csv, "--param", "lr=1e-4",
               "--model", root / "model.safetensors", "--arch", "unet_small", "--num-classes", str(NUM_CLASSES),
               "--arch-kwarg", "width=8", "--data", root / "target.zip", "--eval-data", root / "eval.zip",
               "--size", "32", "--channels", "3", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5",
               "--batch-size", "32", "--epochs", "2", "--seed", "0", "--watch", "--no-download",
               "--url", pg_service.url, timeout=400)
    assert r.returncode == 0, r.stderr + pg_service.logs()
    job_id = r.stderr.split("submitted sfda_prior job ")[1].split()[0]
    from app.client import Client

    with Client(pg_service.url) as c:
        return c.job(job_id), r.stderr


def test_cli_runs_sfda_prior_from_a_prior_file_on_mask_archives(pg_service, cli_prior_job):
    from app.client import Client

    job, err = cli_prior_job
    m = job["metrics"]
    assert "upload prior.csv" in err and "upload eval.zip" in err
    assert f"mIoU       {m['miou_before']:.1%} -> {m['miou_after']:.1%}" in err, err
    assert f"Dice       {m['dice_before']:.1%} -> {m['dice_after']:.1%}" in err
    assert m["miou_after"] > m["miou_before"] + 0.01 and not m["collapse_detected"]
    assert "class_ratio_prior" not in job["spec"]["params"] or job["spec"]["params"]["class_ratio_prior"] is None
    assert m["method_report"]["prior"] == "per_image" and len(m["method_report"]["prior_mean"]) == NUM_CLASSES
    assert m["eval"]["num_images"] == 96 and m["num_images"] == 96
    with Client(pg_service.url) as c:
        upload = c.get_upload(job["spec"]["params"]["prior_upload"])
        assert upload["kind"] == "prior" and upload["filename"] == "prior.csv"
        examples = c.artifact_json(job["id"], "examples.json")
    assert examples["kind"] == "masks" and examples["items"][0]["label"] is not None


def _submit_refused(pg_service, spec) -> "ApiError":
    from app.client import Client

    with Client(pg_service.url) as c, pytest.raises(ApiError) as err:
        c.submit(spec)
    assert err.value.status == 422, err.value
    return err.value


@pytest.mark.parametrize("case,code,field", [
    ("three_classes", "prior_shape_mismatch", "params.prior_upload"),
    ("five_rows", "prior_shape_mismatch", "params.prior_upload"),
    ("negative", "invalid_prior", "params.prior_upload"),
    ("unknown_image", "prior_shape_mismatch", "params.prior_upload"),
    ("dataset_as_prior", "invalid_upload_kind", "params.prior_upload"),
    ("both_priors", "invalid_params", None),
    ("missing_mask", "missing_mask", "eval_data"),
    ("no_masks", "eval_data_unlabelled", "eval_data"),
    ("small_masks", "mask_size_mismatch", "eval_data"),
])
def test_segmentation_inputs_refused_at_submit(pg_service, seg_uploads, tmp_path, case, code, field):
    from app.client import Client

    ids, prior, root = seg_uploads
    with np.load(root / "eval.npz") as f:
        x, y = f["x"][:4], f["y"][:4]
    spec = _spec(ids, "sfda_prior", {"class_ratio_prior": prior})
    with Client(pg_service.url) as c:
        def prior_file(text):
            (tmp_path / "p.csv").write_text(text)
            spec["params"] = {"prior_upload": c.upload(tmp_path / "p.csv", kind="prior")["id"]}

        if case == "three_classes":
            prior_file("0,1,2\n1,1,1\n")
        elif case == "five_rows":
            prior_file(",".join(map(str, range(NUM_CLASSES))) + "\n" + (",".join(["1"] * NUM_CLASSES) + "\n") * 5)
        elif case == "negative":
            prior_file(",".join(map(str, range(NUM_CLASSES))) + "\n-1" + ",1" * (NUM_CLASSES - 1) + "\n")
        elif case == "unknown_image":  # the npz target's images are named 0..95
            prior_file("image," + ",".join(map(str, range(NUM_CLASSES))) + "\n"
                       + "".join(f"{i if i != 7 else 'x'},{','.join(['1'] * NUM_CLASSES)}\n" for i in range(96)))
        elif case == "dataset_as_prior":
            spec["params"] = {"prior_upload": ids["data"]}
        elif case == "both_priors":
            prior_file(",".join(map(str, range(NUM_CLASSES))) + "\n" + ",".join(["1"] * NUM_CLASSES) + "\n")
            spec["params"]["class_ratio_prior"] = prior
        elif case in ("missing_mask", "no_masks"):
            path = _mask_archive(tmp_path, "e.zip", x, None if case == "no_masks" else y, drop={2})
            spec["eval_data"] = {"upload_id": c.upload(path, kind="dataset")["id"]}
        elif case == "small_masks":
            np.savez(tmp_path / "e.npz", x=x, y=y[:, :16, :16])
            spec["eval_data"] = {"upload_id": c.upload(tmp_path / "e.npz", kind="dataset")["id"]}
    err = _submit_refused(pg_service, spec)
    assert err.code == code, err
    if field is not None:
        assert err.detail["field"] == field, err.detail
    if case == "five_rows":
        assert err.detail["rows"] == 5 and err.detail["images"] == 96
    if case == "unknown_image":
        assert err.detail["images_without_row"] == ["7"] and err.detail["rows_without_image"] == ["x"]
    if case == "negative":
        assert err.detail["row"] == 0 and err.detail["column"] == 0
    if case == "missing_mask":
        assert err.detail["examples"] == ["canvases/images/c002.png"]


def _kl(p, q, eps=1e-10):
    return sum(v * (np.log(v + eps) - np.log(w + eps)) for v, w in zip(p, q) if v > 0)


def test_dashboard_shows_the_segmentation_job(pg_service, cli_prior_job, chromium, tmp_path):
    """The finished sfda_prior job in headless Chromium: mIoU/Dice/pixel-accuracy cards before → after, KL
    to the prior, per-class IoU and class proportions vs the prior as the API reports them, and the
    example images with their masks (truth, before, after) and the class legend."""
    import re

    from app.client import Client
    from tests.ux_helpers import chromium_run, png_stats

    job, _ = cli_prior_job
    m = job["metrics"]
    with Client(pg_service.url) as c:
        examples = c.artifact_json(job["id"], "examples.json")
    page = f"{pg_service.url}/#/jobs/{job['id']}"
    r = chromium_run(chromium, page, "--dump-dom", "--virtual-time-budget=10000")
    dom = r.stdout
    assert 'data-ready="1"' in dom, (r.stderr[-2000:], dom[-3000:])

    def card(card_id):
        return dom.split(f'id="{card_id}"', 1)[1].split('<div class="kpi', 1)[0]

    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731 - app.js's pct
    for card_id, key in (("miou", "miou"), ("dice", "dice"), ("pixel-acc", "pixel_accuracy")):
        assert f"{pct(m[key + '_before'])} → {pct(m[key + '_after'])}" in card(card_id), card_id
    prior = m["method_report"]["prior_mean"]
    kl_before, kl_after = _kl(m["class_proportions_before"], prior), _kl(m["class_proportions_after"], prior)
    assert f"{kl_before:.3f} → {kl_after:.3f}" in card("kl-prior")
    assert "none" in card("collapse") and pct(m["agreement_with_source"]) in card("agreement")

    iou = dom.split('id="iou-chart"', 1)[1].split("</svg>", 1)[0]
    after = [float(v) for v in re.findall(r'data-series="after" data-category="[^"]+" data-value="([^"]+)"', iou)]
    assert after == pytest.approx([v for v in m["eval"]["after"]["iou_per_class"] if v is not None])
    props = dom.split('id="proportions-chart"', 1)[1].split("</svg>", 1)[0]
    shown_prior = [float(v) for v in re.findall(r'data-series="prior" data-category="[^"]+" data-value="([^"]+)"', props)]
    assert shown_prior == pytest.approx(prior) and len(shown_prior) == NUM_CLASSES
    assert 'data-category="background"' in props

    gallery = dom.split('id="examples"', 1)[1]
    rows = re.findall(r'<div class="segrow" data-index="(\d+)"', gallery)
    assert [int(i) for i in rows] == [it["index"] for it in examples["items"]] and rows
    for label in ("truth", "before", "after"):
        assert len(re.findall(rf'data-mask="{label}"', gallery)) == len(rows), label
    assert len(re.findall(r'<span data-class="\d+">', gallery)) == NUM_CLASSES

    shot = tmp_path / "segmentation-job.png"
    chromium_run(chromium, page, f"--screenshot={shot}", "--window-size=1280,2200", "--virtual-time-budget=10000")
    size, stddev, colours = png_stats(shot)
    assert size == (1280, 2200) and stddev > 15 and colours > 100, (stddev, colours)
    print(f"\nsegmentation dashboard screenshot: {shot}")
