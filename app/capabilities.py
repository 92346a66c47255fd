"""What this installation can run, found without importing torch: which extras are installed, and
the user-facing sentence when one is missing (`adaptd up` prints it at start; a worker that cannot
run jobs registers it as its reason, and `/readyz` and queued jobs show it).

The worker completes the picture (torch importable for real, the device) with `worker/probe.py` in a
child process, so the prefork parent never imports torch or touches CUDA."""
from __future__ import annotations

import importlib.util
import platform
from importlib import metadata

# What each extra adds, by import name (pyproject.toml's [project.optional-dependencies]).
SERVER_MODULES = ("fastapi", "uvicorn", "sqlalchemy", "alembic", "celery", "multipart")
WORKER_MODULES = ("torch", "torchvision", "safetensors", "PIL")
# Optional libraries some architectures need, by the prefix of the architecture name.
OPTIONAL_ARCHITECTURE_LIBRARIES = {"timm:": "timm"}


def missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def extra_missing_message(extra: str, modules: list[str], what: str) -> str:
    return (f"the '{extra}' extra is not installed ({', '.join(modules)} missing): {what}; "
            f"install it with: pip install 'adaptd[{extra}]'")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def static_capabilities() -> dict:
    """The worker's capabilities as far as they are known without importing torch. `can_run` stays
    False until the engine probe (worker/probe.py) has imported it for real; `reason` says why."""
    from app.contract.catalog import CATALOG
    from app.version import __version__

    absent = missing(WORKER_MODULES)
    libraries = {name: _version(dist) for name, dist in
                 (("torch", "torch"), ("torchvision", "torchvision"), ("safetensors", "safetensors"),
                  ("timm", "timm"), ("pillow", "pillow"))}
    caps = {"adaptd": __version__, "python": platform.python_version(), "libraries": libraries,
            "methods": sorted(CATALOG), "tasks": sorted({t for m in CATALOG.values() for t in m.tasks}),
            "optional_architectures": sorted(p for p, lib in OPTIONAL_ARCHITECTURE_LIBRARIES.items()
                                             if importlib.util.find_spec(lib) is not None),
            "worker_extra": not absent, "torch_importable": None, "device": None, "can_run": False,
            "reason": "starting: checking that the adaptation engine imports"}
    if absent:
        caps["reason"] = extra_missing_message("worker", absent, "this worker cannot run adaptation jobs")
    return caps


def require_server(command: str) -> None:
    """Commands that run the service need the server extra: say so instead of a traceback."""
    absent = missing(SERVER_MODULES)
    if absent:
        raise SystemExit(f"adaptd {command}: " + extra_missing_message("server", absent, "it runs the service"))
