"""Run in a child process of the worker (`python -c`, see `probe_in_child`): import the engine for
real and report JSON on stdout: torch importable, the device jobs with `device: auto` get, the
architectures registered. A child, so that the prefork parent never imports torch or touches CUDA."""
from __future__ import annotations

import json
import subprocess
import sys


def report() -> dict:
    out: dict = {"torch_importable": False, "device": None, "can_run": False, "reason": None}
    try:
        import torch

        from worker.adaptation import runner  # noqa: F401 - everything a job imports
        from worker.adaptation.methods import _load_all  # noqa: F401
        from worker.adaptation.methods.registry import METHODS
        from worker.adaptation.models.registry import ARCHITECTURES, _ensure_builtins_loaded
    except Exception as exc:  # noqa: BLE001 - report why, whatever it is
        out["reason"] = f"the adaptation engine cannot be imported: {type(exc).__name__}: {exc}"[:500]
        return out
    _ensure_builtins_loaded()
    cuda = torch.cuda.is_available()
    out.update(torch_importable=True, can_run=True, device="cuda" if cuda else "cpu",
               cuda_devices=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
               architectures=sorted(ARCHITECTURES), methods=sorted(METHODS))
    return out


def probe_in_child(timeout: float = 300.0) -> dict:
    """`report()` in a fresh interpreter that imports this same code (app.spawn)."""
    from app.spawn import python_command

    cmd = python_command("import json; from worker.probe import report; print(json.dumps(report()))")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        return {"torch_importable": False, "can_run": False,
                "reason": f"the engine probe failed: {type(exc).__name__}: {str(exc)[:300]}"}


if __name__ == "__main__":
    json.dump(report(), sys.stdout)
