"""Row 8: numbers are finite. NaN/Infinity/overflowing values and loosely typed numbers in a spec are
422; checkpoints with negative BatchNorm variances or overflowing weights fail with a precise code;
metrics that come out non-finite are stored as null with a flag (metrics.json stays valid JSON, both
databases answer the same); no job leaves a blob behind."""
from __future__ import annotations

import json

import pytest

from tests.security.conftest import orphaned_blobs, spec, tenant, upload, wait_job

RESULTS: dict[str, dict] = {}  # backend -> what the overflowing model's job stored


def _raw(spec_dict: dict, replace: dict[str, str]) -> bytes:
    """JSON text with placeholders swapped for literals json.dumps would never write (NaN, 1e400)."""
    text = json.dumps(spec_dict)
    for k, v in replace.items():
        text = text.replace(f'"{k}"', v)
    return text.encode()


def test_spec_numbers_are_finite_bounded_and_strictly_typed(sec_postgres_api, assets):
    with tenant(sec_postgres_api) as c:
        model = upload(c, assets["model"].read_bytes(), "model", "m.safetensors")
        data = upload(c, assets["target"].read_bytes())
        base = spec(model["id"], data["id"], assets)
        cases = {
            "params.lr Infinity": (dict(base, params={"lr": "@x"}), {"@x": "Infinity"}, "invalid_params"),
            "params.lr NaN": (dict(base, params={"lr": "@x"}), {"@x": "NaN"}, "invalid_params"),
            "arch_kwargs 1e400": ({**base, "model": {**base["model"], "arch_kwargs": {"width": "@x"}}},
                                  {"@x": "1e400"}, "invalid_params"),
            "mean NaN": ({**base, "preprocess": {**base["preprocess"], "mean": ["@x"]}}, {"@x": "NaN"},
                         "validation_error"),
            "std 1e-320": ({**base, "preprocess": {**base["preprocess"], "std": [1e-320]}}, {}, "validation_error"),
            "std -Infinity": ({**base, "preprocess": {**base["preprocess"], "std": ["@x"]}}, {"@x": "-Infinity"},
                              "validation_error"),
            "batch_size '64'": ({**base, "options": {"batch_size": "64"}}, {}, "validation_error"),
            "batch_size true": ({**base, "options": {"batch_size": True}}, {}, "validation_error"),
            "channels true": ({**base, "preprocess": {**base["preprocess"], "channels": True, "mean": [0.5],
                                                      "std": [0.5]}}, {}, "validation_error"),
            "num_classes '10'": ({**base, "model": {**base["model"], "num_classes": "10"}}, {}, "validation_error"),
            "size over the cap": ({**base, "preprocess": {**base["preprocess"], "size": 2048}}, {}, "validation_error"),
        }
        for name, (body, literals, code) in cases.items():
            r = c.post("/v1/jobs", content=_raw(body, literals), headers={"Content-Type": "application/json"})
            assert r.status_code == 422 and r.json()["error"]["code"] == code, (name, r.status_code, r.text)
        assert c.get("/v1/jobs").json()["items"] == []


def _checkpoint(assets, tmp_path, name: str, change) -> bytes:
    from safetensors.torch import load_file, save_file

    state = load_file(str(assets["model"]))
    change(state)
    path = tmp_path / f"{name}.safetensors"
    save_file(state, str(path))
    return path.read_bytes()


def _negative_var(state):
    k = next(k for k in state if k.endswith("running_var"))
    state[k].fill_(-1.0)


def _huge(state):
    for v in state.values():
        if v.is_floating_point():
            v.fill_(3e38)


def _overflowing(state):  # finite, under the weight cap, but float32 activations overflow to inf/NaN
    for k, v in state.items():
        if v.is_floating_point() and not k.endswith(("running_mean", "running_var")):
            v.fill_(1e14)


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_checkpoints_and_metrics_stay_finite(backend, request, assets, tmp_path):
    service = request.getfixturevalue(f"sec_{backend}")
    with tenant(service) as c:
        data = upload(c, assets["target"].read_bytes())
        outcomes = {}
        for name, change in (("negative_var", _negative_var), ("huge", _huge), ("overflowing", _overflowing)):
            model = upload(c, _checkpoint(assets, tmp_path, name, change), "model", f"{name}.safetensors")
            r = c.post("/v1/jobs", json=spec(model["id"], data["id"], assets))
            assert r.status_code == 202, r.text
            outcomes[name] = wait_job(c, r.json()["id"])
        assert outcomes["negative_var"]["status"] == "failed"
        assert outcomes["negative_var"]["error"]["code"] == "invalid_checkpoint"
        assert outcomes["huge"]["status"] == "failed" and outcomes["huge"]["error"]["code"] == "nonfinite_weights"
        job = outcomes["overflowing"]
        assert job["status"] == "succeeded", job["error"]
        flagged = job["metrics"]["non_finite"]
        assert "entropy_before" in flagged and job["metrics"]["entropy_before"] is None
        raw = c.get(f"/v1/jobs/{job['id']}/artifacts/metrics.json").content

        def no_constants(token):
            raise AssertionError(f"metrics.json holds {token}: not JSON")

        stored = json.loads(raw, parse_constant=no_constants)
        assert stored["non_finite"] == flagged and stored["entropy_before"] is None
        history = c.get(f"/v1/jobs/{job['id']}/artifacts/history.json").content
        json.loads(history, parse_constant=no_constants)
    RESULTS[backend] = {"non_finite": flagged, "codes": {k: (v["error"] or {}).get("code") for k, v in outcomes.items()}}
    if len(RESULTS) == 2:
        assert RESULTS["postgres"] == RESULTS["sqlite"]  # both backends answer the same
    assert orphaned_blobs(service) == []
