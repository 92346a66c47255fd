"""Installed as a user installs it (tests/clean_venv.py): `pip install adaptd` is the client and the
CLI without the server or the engine; `adaptd[server]` without torch runs the service but says, at
start, on /readyz and on each queued job, that no worker can run jobs, and fails such jobs after a
bounded wait; a folder in the current directory with its own `app/` package shadows nothing; a job
needing an extra no live worker has (timm) is refused at submit."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.clean_venv import build_wheel, make_venv
from tests.services import base_env, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def _start_up(venv_python: Path, cwd: Path, log: Path, **env) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([str(venv_python.parent / "adaptd"), "up", "--port", str(port), "--log-level", "warning"],
                            cwd=cwd, env=base_env(ADAPTD_HOME=str(cwd / "home"), **env), stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _poll(fn, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{what} not within {timeout} s; log:\n{log.read_text(errors='replace')[-3000:]}")


def _digit_files(out: Path) -> tuple[Path, Path]:
    """A digit_cnn checkpoint (default arch kwargs) and an 8x8 target set, written without the engine."""
    import torch
    from safetensors.torch import save_file

    from worker.adaptation.models import build_model

    torch.manual_seed(0)
    save_file(build_model("digit_cnn", 10).state_dict(), str(out / "model.safetensors"))
    np.savez(out / "target.npz", x=np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8))
    return out / "model.safetensors", out / "target.npz"


def test_base_install_is_the_client_and_cli_only(wheel, tmp_path):
    python = make_venv(tmp_path / "venv", wheel)
    probe = ("import importlib.util as u; from adaptd import Client, __version__; "
             "print(__version__, [m for m in ('fastapi', 'celery', 'sqlalchemy', 'torch', 'uvicorn') if u.find_spec(m)])")
    out = subprocess.run([str(python), "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0.1.0", "[]"]
    cli = python.parent / "adaptd"
    assert subprocess.run([str(cli), "--help"], capture_output=True, text=True).returncode == 0
    up = subprocess.run([str(cli), "up"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                        env=base_env(ADAPTD_HOME=str(tmp_path / "home")))
    assert up.returncode != 0 and "pip install 'adaptd[server]'" in up.stderr and "Traceback" not in up.stderr


def test_server_without_torch_is_not_ready_and_fails_jobs_fast(wheel, tmp_path):
    python = make_venv(tmp_path / "venv", wheel, ("server",))
    assert subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode != 0
    model, target = _digit_files(tmp_path)
    log = tmp_path / "up.log"
    proc, url = _start_up(python, tmp_path, log, ADAPTD_UNRUNNABLE_AFTER_S="3")
    try:
        def not_ready():
            r = httpx.get(f"{url}/readyz", timeout=5)
            return r.status_code == 503 and r.json()["error"]["detail"]["workers"] and r
        ready = _poll(not_ready, 120, "/readyz listing the worker", log).json()["error"]
        assert ready["detail"]["checks"]["database"] == ready["detail"]["checks"]["broker"] == "ok"
        assert "torch" in ready["message"] and "adaptd[worker]" in ready["detail"]["checks"]["workers"]
        assert [w["can_run"] for w in ready["detail"]["workers"]] == [False]

        from app.client import Client
        with Client(url) as c:
            job = c.submit(method="tent", model=str(model), architecture="digit_cnn", num_classes=10,
                           data=str(target))
            assert job["status"] == "queued" and "adaptd[worker]" in job["waiting_reason"]
            final = c.wait(job["id"], timeout=60)
        assert final["status"] == "failed" and final["error"]["code"] == "no_capable_worker", final
        assert "torch" in final["error"]["message"]
    finally:
        _stop(proc)
    text = log.read_text(errors="replace")
    assert "the 'worker' extra is not installed" in text and "Traceback" not in text


def test_a_local_app_package_does_not_shadow_the_worker(wheel, tmp_path):
    """The usual FastAPI layout: the user's own `app/` in the current directory."""
    python = make_venv(tmp_path / "venv", wheel, ("worker",))
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "__init__.py").write_text("raise SystemExit('the user app was imported')\n")
    model, target = _digit_files(tmp_path)
    log = tmp_path / "up.log"
    proc, url = _start_up(python, tmp_path, log)
    try:
        _poll(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, 180, "ready", log)
        from app.client import ApiError, Client
        with Client(url) as c:
            job = c.submit(method="source", model=str(model), architecture="digit_cnn", num_classes=10,
                           data=str(target))
            final = c.wait(job["id"], timeout=180)
            with pytest.raises(ApiError) as refused:  # the timm extra is not installed on this worker
                c.submit(method="source", model=str(model), architecture="timm:resnet18", num_classes=10,
                         data=str(target))
            assert refused.value.code == "architecture_unavailable" and "adaptd[timm]" in refused.value.message
        assert final["status"] == "succeeded", (final, log.read_text(errors="replace")[-3000:])
    finally:
        _stop(proc)
    assert "the user app was imported" not in log.read_text(errors="replace")
