"""Models describe themselves and uploads are checked before anything queues, in the API process and
without torch: the key manifest is the architectures' own, pickles are judged by their opcodes, a
spec without preprocess takes the architecture's default input, and an adapted model resubmitted
needs no flags (client and CLI)."""
from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from app.checks import CheckError
from app.checks import manifest
from app.checks.checkpoints import inspect_checkpoint
from app.client import ApiError, Client
from tests import builders
from tests.services import REPO


def test_key_manifest_is_generated_from_the_architectures():
    """Regenerating from the torch models gives the committed file (`python -m worker.adaptation.models.key_manifest`)."""
    from worker.adaptation.models.key_manifest import generate

    assert generate() == manifest.load()


def _inspect(data: bytes):
    return inspect_checkpoint(io.BytesIO(data), len(data), manifest.allowed_globals())


def _saved(obj, **kwargs) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("kwargs", [{}, {"_use_new_zipfile_serialization": False}])
def test_torch_checkpoints_are_read_without_unpickling(kwargs):
    from worker.adaptation.models import build_model

    state = build_model("digit_cnn", 10).state_dict()
    ckpt = _inspect(_saved({"state_dict": state, "epoch": 3}, **kwargs))
    assert ckpt.format == "pt" and ckpt.notes == ["unwrapped 'state_dict'"]
    assert ckpt.shapes == {k: list(v.shape) for k, v in state.items()}
    with pytest.raises(CheckError) as refused:
        _inspect(_saved(build_model("digit_cnn", 10), **kwargs))  # a whole pickled nn.Module
    assert refused.value.code == "unsafe_checkpoint"
    assert refused.value.detail["global"] == "worker.adaptation.models.digit_cnn.DigitCNN"


@pytest.mark.parametrize("container, payload", [("torch", "open"), ("torch", "system"), ("pickle", "open"),
                                                ("pickle", "system")])
def test_malicious_pickles_are_refused_by_their_opcodes(tmp_path, container, payload):
    marker = tmp_path / "pwned"
    path = builders.malicious_checkpoint(tmp_path / "evil.pt", marker, container=container, payload=payload)
    with pytest.raises(CheckError) as refused:
        _inspect(path.read_bytes())
    assert refused.value.code == "unsafe_checkpoint" and not marker.exists()


def test_stack_global_pickle_is_refused():
    """Protocol 4 names globals with STACK_GLOBAL, which weights_only never accepts."""
    with pytest.raises(CheckError) as refused:
        _inspect(pickle.dumps({"w": builders.WriteMarker("/nonexistent/x")}, protocol=4))
    assert refused.value.code == "unsafe_checkpoint"


def test_truncated_safetensors_is_refused():
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    with pytest.raises(CheckError) as refused:
        _inspect(struct.pack("<Q", len(header)) + header + b"\x00" * 8)
    assert refused.value.code == "invalid_checkpoint"


# --- through the API (the embedded service) -------------------------------------------------------

@pytest.fixture(scope="module")
def c(embedded_service):
    with Client(embedded_service.url) as client:
        yield client


@pytest.fixture(scope="module")
def ups(c, assets):
    return {"model": c.upload(assets["model"], "model")["id"], "target": c.upload(assets["target"], "dataset")["id"],
            "eval": c.upload(assets["eval"], "dataset")["id"]}


def test_spec_without_preprocess_uses_the_architecture_default(c, ups, assets):
    job = c.submit({"method": "source", "model": {"upload_id": ups["model"], "architecture": "digit_cnn",
                                                   "num_classes": 10, "arch_kwargs": assets["arch_kwargs"]},
                    "data": {"upload_id": ups["target"]}, "eval_data": {"upload_id": ups["eval"]}})
    assert job["spec"]["preprocess"] == {"channels": 1, "size": 32, "mean": [0.5], "std": [0.5]}
    job = c.wait(job["id"], timeout=180)
    assert job["status"] == "succeeded", job["error"]  # was input_shape_mismatch: 3 channels by default


def test_adapted_model_resubmits_without_flags(c, ups, assets, tmp_path):
    first = c.wait(c.submit(method="bn_adapt", model=ups["model"], architecture="digit_cnn", num_classes=10,
                            arch_kwargs=assets["arch_kwargs"], data=ups["target"], preprocess=assets["preprocess"],
                            options={"batch_size": 64})["id"], timeout=180)
    assert first["status"] == "succeeded", first["error"]
    adapted = c.download(first["id"], "model.safetensors", tmp_path / "adapted.safetensors")
    with open(adapted, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n))["__metadata__"]
    assert meta["architecture"] == "digit_cnn" and meta["num_classes"] == "10" and meta["task"] == "classification"
    assert json.loads(meta["arch_kwargs"]) == assets["arch_kwargs"] and meta["method"] == "bn_adapt"
    assert json.loads(meta["preprocess"]) == {**assets["preprocess"]} and meta["adaptd_version"]
    assert set(load_file(str(adapted))) == set(load_file(str(assets["model"])))

    again = c.submit(method="tent", model=adapted, data=ups["target"])  # client: no flags
    assert again["spec"]["model"]["architecture"] == "digit_cnn"
    assert again["spec"]["model"]["arch_kwargs"] == assets["arch_kwargs"]
    assert again["spec"]["preprocess"] == assets["preprocess"]
    assert c.wait(again["id"], timeout=180)["status"] == "succeeded"

    cli = subprocess.run([sys.executable, "-m", "app.cli", "submit", "--url", c.http.base_url.__str__(),
                          "--method", "source", "--model", str(adapted), "--data", str(assets["target"]), "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["spec"]["model"]["num_classes"] == 10


def test_checkpoint_without_metadata_needs_the_architecture(c, ups):
    with pytest.raises(ApiError) as refused:
        c.submit(method="source", model=ups["model"], data=ups["target"])
    assert refused.value.status == 422 and refused.value.detail["field"] == "model.architecture"


def test_bad_npz_is_refused_at_submit(c, ups, tmp_path):
    np.savez(tmp_path / "float.npz", x=np.zeros((4, 8, 8), np.float32))
    np.savez(tmp_path / "labels.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.zeros(3, np.int64))
    for name, needle in (("float.npz", "uint8"), ("labels.npz", "integer labels for the 4 images")):
        bad = c.upload(tmp_path / name, "dataset")["id"]
        with pytest.raises(ApiError) as refused:
            c.submit(method="source", model=ups["model"], architecture="digit_cnn", num_classes=10,
                     arch_kwargs={"width": 16}, data=ups["target"], eval_data=bad)
        assert refused.value.code == "invalid_dataset" and needle in refused.value.message
        assert refused.value.detail["field"] == "eval_data"
    with pytest.raises(ApiError) as refused:
        c.submit(method="source", model=ups["model"], architecture="digit_cnn", num_classes=10,
                 arch_kwargs={"width": 16}, data=ups["target"], data_format="tar")
    assert refused.value.code == "format_mismatch"


def test_unknown_arch_kwargs_are_refused_with_the_accepted_ones(c, ups):
    with pytest.raises(ApiError) as refused:
        c.submit(method="source", model=ups["model"], architecture="digit_cnn", num_classes=10,
                 arch_kwargs={"widht": 16}, data=ups["target"])
    assert refused.value.code == "invalid_arch_kwargs" and "width" in refused.value.detail["accepted"]
