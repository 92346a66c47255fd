"""Shared fixtures: real PostgreSQL + Redis + Celery worker processes, the embedded service, and
small real assets (a digit CNN trained on sklearn's digits, a shifted target set)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from tests import services
from tests.services import Service, base_env


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict:
    """A digit CNN trained on sklearn's digits and the demo's shifted target set, as files a user
    would upload."""
    import torch

    from app.demo import ARCH_KWARGS, PREPROCESS
    from app.demo_data import make_demo_split
    from worker.adaptation.data import Preprocess
    from worker.adaptation.models import build_model
    from worker.adaptation.models.export import save_safetensors
    from worker.adaptation.training import train_classifier

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("assets")
    split = make_demo_split(seed=0)
    model = build_model("digit_cnn", 10, **ARCH_KWARGS)
    train_classifier(model, split["x_source"], split["y_source"], Preprocess(**PREPROCESS), epochs=6,
                     augment_shift=1)
    save_safetensors(model, out / "model.safetensors")
    np.savez(out / "target.npz", x=split["x_target"])
    np.savez(out / "eval.npz", x=split["x_target"], y=split["y_target"])
    return {"dir": out, "model": out / "model.safetensors", "target": out / "target.npz",
            "eval": out / "eval.npz", "x": split["x_target"], "y": split["y_target"],
            "preprocess": PREPROCESS, "arch_kwargs": ARCH_KWARGS}


@pytest.fixture(scope="session")
def detection_assets(tmp_path_factory) -> dict:
    """A CPU-sized detector (fcos_small) trained briefly on canvases of scikit-learn's digits (label = 1 +
    digit), and a target set of other digits under a sensor shift (lower contrast, brighter, noisy) with its
    boxes: the engine and HTTP detection tests share it (trained once per session, ~30 s on one thread)."""
    import torch

    from app.demo_data import load_sklearn_digits
    from worker.adaptation.canvases import make_canvases, noise_contrast, to_rgb
    from worker.adaptation.device import seed_everything
    from worker.adaptation.models import build_model
    from worker.adaptation.models.export import save_safetensors
    from worker.adaptation.training import train_detector

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("detection")
    x, y = load_sklearn_digits()
    src = make_canvases(x[:1000], y[:1000], 256, size=32, digit_size=12, seed=0)
    tgt = make_canvases(x[1000:], y[1000:], 96, size=32, digit_size=12, seed=1)
    arch_kwargs = {"min_size": 32, "max_size": 32}
    seed_everything(0)
    model = train_detector(build_model("fcos_small", 11, **arch_kwargs), to_rgb(src.x), src.boxes, src.labels + 1,
                           src.image_index, epochs=20, lr=3e-3)
    save_safetensors(model, out / "model.safetensors")
    target_x = noise_contrast(to_rgb(tgt.x), seed=2, contrast=0.8, brightness=20, sigma=10)
    boxes = {"boxes": tgt.boxes, "labels": tgt.labels + 1, "image_index": tgt.image_index}
    np.savez(out / "target.npz", x=target_x)
    np.savez(out / "eval.npz", x=target_x, **boxes)
    return {"dir": out, "model": out / "model.safetensors", "target": out / "target.npz", "eval": out / "eval.npz",
            "x": target_x, **boxes, "arch_kwargs": arch_kwargs, "num_classes": 11}


@pytest.fixture(scope="session")
def pg_service(tmp_path_factory):
    """API + one worker on a fresh PostgreSQL database and Redis, migrated, blob bytes in files
    (ADAPTD_BLOB_DIR, as docker-compose.yml runs it; tests/security's PostgreSQL services keep the default,
    chunk rows)."""
    log_dir = tmp_path_factory.mktemp("pg-service-logs")
    with services.pg_service(log_dir, ADAPTD_MAX_UPLOAD_BYTES=str(1024**3), ADAPTD_BLOB_DIR=str(log_dir / "blobs"),
                             # tests/test_webhook.py checks signatures, with a loopback receiver
                             ADAPTD_WEBHOOK_SECRET="adaptd-test-webhook-secret",
                             ADAPTD_WEBHOOK_ALLOWED_HOSTS="127.0.0.1/32") as service:
        yield service


@pytest.fixture(scope="session")
def embedded_service(tmp_path_factory):
    """`adaptd up` with nothing configured: SQLite, filesystem broker, one worker."""
    home = tmp_path_factory.mktemp("embedded-home")
    service = Service(env=base_env(ADAPTD_HOME=str(home), ADAPTD_MAX_UPLOAD_BYTES=str(64 * 1024**2)),
                      log_dir=home)
    service.start_embedded()
    yield service
    service.stop()


@pytest.fixture(params=["postgres", "embedded"])
def service(request) -> Service:
    return request.getfixturevalue("pg_service" if request.param == "postgres" else "embedded_service")


@pytest.fixture(scope="session")
def chromium() -> str:
    """Headless Chromium's binary (the dashboard and /docs tests)."""
    from tests.ux_helpers import chromium_binary

    binary = chromium_binary()
    if binary is None:
        if os.environ.get("CI"):  # CI installs it (.ci/run): missing there is a failure, not a skip
            pytest.fail("chromium is not installed")
        pytest.skip("chromium is not installed (.ci/setup installs Debian's package where it can)")
    return binary


@pytest.fixture
def client(service):
    from app.client import Client

    with Client(service.url) as c:
        yield c
