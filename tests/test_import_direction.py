"""Imports go one way: the API (app/) runs without the worker package and without torch; the worker
depends on the contract and the platform, never the reverse. Checked in a fresh interpreter whose
import system refuses `worker` and `torch`, as in the API image (which does not contain them)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib.abc, json, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("worker", "torch", "torchvision"):
            raise ImportError(f"blocked: {name}")
        return None

sys.meta_path.insert(0, Blocker())

from app.db.migrate import upgrade_head
from app.config import get_settings
upgrade_head(get_settings().resolved_database_url)

from fastapi.testclient import TestClient
from app.main import create_app

with TestClient(create_app()) as c:
    methods = c.get("/v1/methods")
    ref = {"upload_id": "00000000-0000-0000-0000-000000000000"}
    spec = {"method": "tent", "model": {**ref, "architecture": "digit_cnn", "num_classes": 10}, "data": ref}
    unknown = c.post("/v1/jobs", json={**spec, "method": "magic"})
    bad_params = c.post("/v1/jobs", json={**spec, "params": {"lr": -1}})
    bad_task = c.post("/v1/jobs", json={**spec, "task": "teleportation"})
    missing_upload = c.post("/v1/jobs", json=spec)
print(json.dumps({
    "methods": methods.status_code, "names": [m["name"] for m in methods.json()["methods"]],
    "unknown": [unknown.status_code, unknown.json()["error"]["code"]],
    "bad_params": [bad_params.status_code, bad_params.json()["error"]["code"]],
    "bad_task": [bad_task.status_code, bad_task.json()["error"]["code"]],
    "missing_upload": [missing_upload.status_code, missing_upload.json()["error"]["code"]],
    "loaded": sorted({m.split(".")[0] for m in sys.modules} & {"worker", "torch"}),
}))
"""


def test_api_serves_and_validates_without_worker_or_torch(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "ADAPTD_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["methods"] == 200 and {"tent", "shot", "source"} <= set(out["names"])
    assert out["unknown"] == [422, "unknown_method"]
    assert out["bad_params"] == [422, "invalid_params"]
    assert out["bad_task"] == [422, "validation_error"]  # not a task this service knows
    assert out["missing_upload"] == [422, "unknown_upload"]
    assert out["loaded"] == []


def _imported_top_packages(root: Path) -> dict[str, set[str]]:
    """Module -> the top-level packages of this repository it imports (absolute imports only)."""
    out = {}
    for path in root.rglob("*.py"):
        tops = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops.add(node.module.split(".")[0])
        out[str(path.relative_to(REPO))] = tops & {"app", "worker"}
    return out


def test_no_app_module_imports_the_worker_package():
    offenders = {m: t for m, t in _imported_top_packages(REPO / "app").items() if "worker" in t}
    assert offenders == {}


# What the worker may use of app/: the contract and the platform, never the API's routes or services.
WORKER_MAY_IMPORT = ("app.contract", "app.checks", "app.config", "app.db", "app.storage", "app.queue",
                     "app.netguard", "app.spawn", "app.capabilities", "app.demo_data")


def test_the_worker_uses_only_the_contract_and_the_platform():
    offenders = {}
    for path in (REPO / "worker").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                if name.split(".")[0] == "app" and not name.startswith(WORKER_MAY_IMPORT):
                    offenders.setdefault(str(path.relative_to(REPO)), []).append(name)
    assert offenders == {}
