"""The stored job spec -> the engine's request: re-validated with the API's JobSpec (app/contract), inputs
fetched to local files."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from pydantic import ValidationError

from app.contract.catalog import get_method_info
from app.contract.jobs import JobSpec
from worker.adaptation.errors import AdaptationError
from worker.adaptation.multisource_run import DistillRequest
from worker.adaptation.runner import RunRequest


def build_run_request(stored: dict, workdir: Path, fetch: Callable[[str, Path], Path]) -> RunRequest | DistillRequest:
    """`fetch(upload_id, destination)` copies an upload's bytes to a local file (streamed)."""
    try:
        spec = JobSpec.model_validate(stored)
    except ValidationError as exc:  # e.g. queued before a validation rule tightened: the spec's fault
        first = exc.errors()[0]
        raise AdaptationError("invalid_spec", f"the stored job spec does not validate: "
                              f"{'.'.join(map(str, first['loc']))}: {first['msg']}",
                              {"errors": exc.errors(include_url=False, include_context=False)}) from None
    inputs: dict[str, Path] = {}

    def local(upload_id: str, name: str) -> Path:
        if upload_id not in inputs:  # data and eval_data may be the same upload: fetch it once
            inputs[upload_id] = fetch(upload_id, workdir / name)
        return inputs[upload_id]

    data_path = local(spec.data.upload_id, "data.bin")
    eval_path = local(spec.eval_data.upload_id, "eval.bin") if spec.eval_data else None
    if spec.models is not None:
        student = spec.student
        return DistillRequest(
            spec, source_paths=[local(m.upload_id, f"source{i}.bin") for i, m in enumerate(spec.models)],
            student_path=local(student.upload_id, "student.bin") if student.upload_id else None,
            data_path=data_path, output_dir=workdir / "out", eval_path=eval_path,
            labelled_path=local(spec.labelled_data.upload_id, "labelled.bin") if spec.labelled_data else None)
    files = {name: local(spec.params[name], f"param-{name}.bin")
             for name, _ in get_method_info(spec.method).upload_params() if spec.params.get(name)}
    return RunRequest(spec, model_path=local(spec.model.upload_id, "model.bin"), data_path=data_path,
                      output_dir=workdir / "out", eval_path=eval_path, param_files=files,
                      source_path=local(spec.source_data.upload_id, "source.bin") if spec.source_data else None)
