"""Bring your own model and data, through the HTTP API: every accepted format runs, every hostile or
broken input fails the job with its precise code, and nothing else is affected."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from app.client import ApiError, Client
from tests import builders

MODEL_SPEC = {"architecture": "digit_cnn", "num_classes": 10}
PRE = {"size": 16, "channels": 1, "mean": [0.5], "std": [0.5]}


@pytest.fixture(scope="module")
def c(embedded_service):
    with Client(embedded_service.url) as client:
        yield client


@pytest.fixture(scope="module")
def state(assets):
    return load_file(str(assets["model"]))


@pytest.fixture(scope="module")
def base(c, assets):
    return {"model": c.upload(assets["model"], "model"), "data": c.upload(assets["target"], "dataset")}


def run_job(c: Client, model_id: str, data_id: str, eval_id: str | None = None, method: str = "source",
            model: dict | None = None, pre: dict | None = None, data_format: str | None = None) -> dict:
    spec = {"method": method,
            "model": {"upload_id": model_id, **MODEL_SPEC, "arch_kwargs": {"width": 16}, **(model or {})},
            "data": {"upload_id": data_id, **({"format": data_format} if data_format else {})},
            "preprocess": PRE if pre is None else pre, "options": {"batch_size": 16}}
    if eval_id:
        spec["eval_data"] = {"upload_id": eval_id}
    try:
        return c.wait(c.submit(spec)["id"], timeout=180)
    except ApiError as exc:  # refused at submit: nothing was queued
        assert exc.status == 422, exc
        return {"status": "refused", "error": {"code": exc.code, "message": exc.message, "detail": exc.detail}}


# --- models ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, wrap, prefix, note", [
    ("pt", None, "", None),
    ("pt", "state_dict", "module.", "module."),
    ("pt", "model_state_dict", "_orig_mod.", "_orig_mod."),
    ("pt", "model", "module._orig_mod.", "_orig_mod."),
    ("safetensors", None, "module.", "module."),
])
def test_checkpoint_formats_load(c, base, state, tmp_path, fmt, wrap, prefix, note):
    path = builders.save_checkpoint(state, tmp_path / f"ckpt.{fmt}", fmt=fmt, wrap=wrap, prefix=prefix,
                                    extra={"epoch": 3} if wrap else None)
    job = run_job(c, c.upload(path, "model")["id"], base["data"]["id"])
    assert job["status"] == "succeeded", job["error"]
    notes = " ".join(job["metrics"]["model_load"]["notes"])
    if note:
        assert note in notes, notes
    if wrap:
        assert wrap in notes, notes


@pytest.mark.parametrize("container, payload", [("torch", "open"), ("torch", "system"), ("pickle", "open")])
def test_malicious_pickle_is_refused_and_never_runs(c, base, tmp_path, container, payload):
    marker = tmp_path / f"pwned-{container}-{payload}"
    path = builders.malicious_checkpoint(tmp_path / "evil.pt", marker, container=container, payload=payload)
    job = run_job(c, c.upload(path, "model")["id"], base["data"]["id"])
    assert job["status"] == "refused" and job["error"]["code"] == "unsafe_checkpoint", job  # at submit
    assert "state_dict" in job["error"]["message"]  # tells the user what to save instead
    assert not marker.exists()


def test_broken_models_get_precise_codes(c, base, state, tmp_path):
    wide = builders.save_checkpoint(state, tmp_path / "w.safetensors", fmt="safetensors")
    job = run_job(c, c.upload(wide, "model")["id"], base["data"]["id"], model={"arch_kwargs": {"width": 32}})
    assert job["status"] == "refused" and job["error"]["code"] == "shape_mismatch", job
    assert job["error"]["detail"]["shape_mismatch"] and job["error"]["detail"]["suggestion"] == {
        "arch_kwargs": {"width": 16}}, job  # the fix, solved from the shapes

    job = run_job(c, c.upload(wide, "model")["id"], base["data"]["id"], model={"num_classes": 7})
    assert job["status"] == "refused" and job["error"]["code"] == "num_classes_mismatch", job

    nan_state = {k: v.clone() for k, v in state.items()}
    nan_state["classifier.weight"][0, 0] = math.nan
    nan = builders.save_checkpoint(nan_state, tmp_path / "nan.safetensors", fmt="safetensors")
    job = run_job(c, c.upload(nan, "model")["id"], base["data"]["id"])
    assert job["error"]["code"] == "nonfinite_weights" and "classifier.weight" in job["error"]["detail"]["tensors"]

    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00\x01not a checkpoint" * 10)
    job = run_job(c, c.upload(garbage, "model")["id"], base["data"]["id"])
    assert job["status"] == "refused" and job["error"]["code"] == "unsupported_format", job

    job = run_job(c, base["model"]["id"], base["data"]["id"], model={"architecture": "evil.module:factory"})
    assert job["error"]["code"] == "architecture_not_allowed", job


def test_norm_method_on_model_without_batchnorm(c, base, tmp_path):
    from worker.adaptation.models import build_model

    vit = build_model("vit_small_digits", 10, image_size=16, patch_size=4, in_channels=1, dim=16, depth=1,
                      heads=2)
    path = builders.save_checkpoint(vit.state_dict(), tmp_path / "vit.safetensors", fmt="safetensors")
    job = run_job(c, c.upload(path, "model")["id"], base["data"]["id"], method="bn_adapt",
                  model={"architecture": "vit_small_digits", "arch_kwargs": {
                      "image_size": 16, "patch_size": 4, "in_channels": 1, "dim": 16, "depth": 1, "heads": 2}})
    assert job["status"] == "failed" and job["error"]["code"] == "no_norm_layers", job


def test_timm_model_adapts(c, tmp_path):
    """A real timm architecture (random init, nothing downloaded) through the whole service."""
    import numpy as np
    import timm  # the dev extra installs it

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=10)
    path = builders.save_checkpoint(model.state_dict(), tmp_path / "timm.safetensors", fmt="safetensors")
    x = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", x=x)
    job = run_job(c, c.upload(path, "model")["id"], c.upload(tmp_path / "rgb.npz", "dataset")["id"], method="tent",
                  model={"architecture": "timm:test_efficientnet", "arch_kwargs": {}},
                  pre={"size": 32, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3})
    assert job["status"] == "succeeded", job["error"]
    assert job["metrics"]["num_images"] == 24 and job["progress"]["total"] == 2


# --- data -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, image_format, mode", [
    ("zip", "PNG", "L"), ("zip", "JPEG", "RGB"), ("zip", "WEBP", "RGBA"),
    ("tar", "PNG", "RGB"), ("tar.gz", "PNG", "RGBA"), ("tar.gz", "WEBP", "L"),
])
def test_image_archives_adapt(c, base, tmp_path, fmt, image_format, mode):
    data, _ = builders.image_archive(tmp_path / f"data.{fmt}", fmt=fmt, layout="flat", image_format=image_format,
                                     mode=mode, per_class=8)
    labelled, _ = builders.image_archive(tmp_path / f"eval.{fmt}", fmt=fmt, layout="classes", classes=("0", "1", "2"),
                                         image_format=image_format, mode=mode, per_class=4, wrapper="digits")
    job = run_job(c, base["model"]["id"], c.upload(data, "dataset")["id"], c.upload(labelled, "dataset")["id"],
                  method="bn_adapt")
    assert job["status"] == "succeeded", job["error"]
    m = job["metrics"]
    assert m["num_images"] == 16 and m["eval"]["num_images"] == 12
    assert m["eval"]["class_names"] == ["0", "1", "2"]


def _digits(n: int, seed: int = 0) -> tuple[list[bytes], list[int]]:
    images = [builders.encode_image(builders.random_image(12, 12, "L", seed=seed + i)) for i in range(n)]
    return images, [i % 3 for i in range(n)]


@pytest.mark.parametrize("fmt", ["parquet", "hf_dataset", "webdataset"])
def test_dataset_exports_adapt(c, base, tmp_path, fmt):
    """Hugging Face `datasets` exports and a WebDataset shard, uploaded as they are, as target and eval data."""
    def build(name: str, n: int, seed: int):
        images, labels = _digits(n, seed)
        if fmt == "webdataset":
            return builders.build_tar(tmp_path / f"{name}.tar", builders.webdataset_files(images, labels))
        table = builders.hf_table(images, labels, ["0", "1", "2"])
        if fmt == "parquet":
            return builders.hf_parquet(tmp_path / f"{name}.parquet", table)
        return builders.hf_saved_dataset_zip(tmp_path / f"{name}.zip", table, shards=2)

    job = run_job(c, base["model"]["id"], c.upload(build("data", 20, 0), "dataset")["id"],
                  c.upload(build("eval", 9, 100), "dataset")["id"], method="bn_adapt")
    assert job["status"] == "succeeded", job["error"]
    m = job["metrics"]
    assert m["num_images"] == 20 and m["eval"]["num_images"] == 9
    assert m["eval"]["class_names"] == (None if fmt == "webdataset" else ["0", "1", "2"])
    assert 0 <= m["accuracy_after"] <= 1  # labels were read: accuracy is computed


def test_dataset_export_refusal_is_a_precise_code(c, base, tmp_path):
    images, _ = _digits(2)
    table = builders.hf_table([images[0], None], paths=[None, "/data/cats/1.png"])
    data = c.upload(builders.hf_parquet(tmp_path / "paths.parquet", table), "dataset")
    job = run_job(c, base["model"]["id"], data["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "image_not_embedded", job
    assert "/data/cats/1.png" in job["error"]["message"]


def _zip(tmp_path, files):
    return builders.build_zip(tmp_path / "bad.zip", files)


def _png(seed=0, size=8):
    return builders.encode_image(builders.random_image(size, size, "RGB", seed=seed))


@pytest.mark.parametrize("make, code, pre", [
    (lambda p: _zip(p, {"ok.png": _png(), "../evil.png": _png(1)}), "archive_path_traversal", PRE),
    (lambda p: _zip(p, {"ok.png": _png(), "/etc/evil.png": _png(1)}), "archive_path_traversal", PRE),
    (lambda p: builders.build_tar(p / "bad.tar", {"ok.png": _png()}, symlinks={"link.png": "/etc/passwd"}),
     "archive_symlink", PRE),
    (lambda p: builders.zip_with_symlink(p / "bad.zip"), "archive_symlink", PRE),
    (lambda p: builders.zip_bomb(p / "bomb.zip"), "archive_compression_ratio", PRE),
    (lambda p: _zip(p, {"ok.png": _png(), "notes.png": b"this is not an image at all"}), "not_an_image", PRE),
    (lambda p: _zip(p, {"ok.png": _png(size=32), "cut.png": _png(1, size=32)[:60]}), "truncated_image", PRE),
    (lambda p: _zip(p, {"a.png": _png(size=8), "b.png": _png(1, size=12)}), "mixed_image_sizes",
     {**PRE, "size": None}),
    (lambda p: _zip(p, {".DS_Store": b"", "__MACOSX/x.png": b"junk"}), "empty_archive", PRE),
])
def test_hostile_archives_are_refused(c, base, embedded_service, tmp_path, make, code, pre):
    data = c.upload(make(tmp_path), "dataset")
    job = run_job(c, base["model"]["id"], data["id"], pre=pre)
    assert job["status"] == "failed" and job["error"]["code"] == code, job
    assert job["error"]["message"]
    # the service is unaffected: the next job runs
    assert run_job(c, base["model"]["id"], base["data"]["id"])["status"] == "succeeded"


def test_downloaded_weights_keep_dtype(c, base, state, tmp_path):
    job = run_job(c, base["model"]["id"], base["data"]["id"], method="bn_adapt")
    out = c.download(job["id"], "model.safetensors", tmp_path / "out.safetensors")
    adapted = load_file(str(out))
    assert set(adapted) == set(state) and all(adapted[k].dtype == state[k].dtype for k in state)
    assert not torch.equal(adapted["features.1.running_mean"], state["features.1.running_mean"])
