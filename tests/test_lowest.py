"""The API side without torch: `.ci/lowest` runs this module on the lowest versions pyproject.toml
allows (and it runs in the normal suite too). `adaptd api` with no worker: methods served, readiness
false with the reason, a job accepted and left queued with the reason, a mismatching checkpoint refused
at submit with the fix; the checkpoints are written without torch from the key manifest."""
from __future__ import annotations

import httpx
import numpy as np
import pytest

from app.client import ApiError, Client
from tests.helpers import digit_cnn_shapes, write_safetensors
from tests.services import Service, base_env


@pytest.fixture(scope="module")
def api_only(tmp_path_factory):
    home = tmp_path_factory.mktemp("api-only")
    service = Service(env=base_env(ADAPTD_HOME=str(home)), log_dir=home)
    service.start_api()
    yield service
    service.stop()


def test_api_without_workers(api_only, tmp_path):
    url = api_only.url
    assert {m["name"] for m in httpx.get(f"{url}/v1/methods").json()["methods"]} >= {"source", "tent"}
    ready = httpx.get(f"{url}/readyz")
    assert ready.status_code == 503 and "no worker is running" in ready.json()["error"]["detail"]["checks"]["workers"]

    write_safetensors(tmp_path / "m.safetensors", digit_cnn_shapes(width=16))
    np.savez(tmp_path / "t.npz", x=np.zeros((8, 16, 16), np.uint8))
    with Client(url) as c:
        job = c.submit(method="tent", model=tmp_path / "m.safetensors", architecture="digit_cnn", num_classes=10,
                       arch_kwargs={"width": 16}, data=tmp_path / "t.npz")
        assert job["status"] == "queued" and "no worker is running" in job["waiting_reason"]
        assert job["spec"]["preprocess"]["channels"] == 1
        with pytest.raises(ApiError) as refused:
            c.submit(method="tent", model=tmp_path / "m.safetensors", architecture="digit_cnn", num_classes=10,
                     data=tmp_path / "t.npz")
    assert refused.value.code == "shape_mismatch"
    assert refused.value.detail["suggestion"] == {"arch_kwargs": {"width": 16}}
