"""The stored job spec -> the engine's RunRequest: re-validated by the API's own `JobSpec` (so the worker
and the API read it with the same model and the same defaults), its uploads fetched to local files."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from app.contract.jobs import JobSpec
from worker.adaptation.runner import RunRequest


def build_run_request(stored: dict, workdir: Path, fetch: Callable[[str, Path], Path]) -> RunRequest:
    """`fetch(upload_id, destination)` copies an upload's bytes to a local file (streamed)."""
    spec = JobSpec.model_validate(stored)
    inputs: dict[str, Path] = {}

    def local(upload_id: str, name: str) -> Path:
        if upload_id not in inputs:  # data and eval_data may be the same upload: fetch it once
            inputs[upload_id] = fetch(upload_id, workdir / name)
        return inputs[upload_id]

    return RunRequest(spec, model_path=local(spec.model.upload_id, "model.bin"),
                      data_path=local(spec.data.upload_id, "data.bin"), output_dir=workdir / "out",
                      eval_path=local(spec.eval_data.upload_id, "eval.bin") if spec.eval_data else None)
