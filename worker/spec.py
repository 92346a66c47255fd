"""The stored job spec (DESIGN §4, validated by the API) -> the engine's RunRequest."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from worker.adaptation.data import Preprocess
from worker.adaptation.runner import RunRequest


def build_run_request(spec: dict, workdir: Path, fetch: Callable[[str, Path], Path]) -> RunRequest:
    """`fetch(upload_id, destination)` copies an upload's bytes to a local file (streamed)."""
    inputs: dict[str, Path] = {}

    def local(upload_id: str, name: str) -> Path:
        if upload_id not in inputs:  # data and eval_data may be the same upload: fetch it once
            inputs[upload_id] = fetch(upload_id, workdir / name)
        return inputs[upload_id]

    model, data, eval_data = spec["model"], spec["data"], spec.get("eval_data")
    pre = spec.get("preprocess") or {}
    opts = spec.get("options") or {}
    channels = pre.get("channels", 3)
    return RunRequest(
        method=spec["method"], params=spec.get("params") or {},
        model_path=local(model["upload_id"], "model.bin"), model_format=model.get("format"),
        architecture=model["architecture"], num_classes=model["num_classes"],
        arch_kwargs=model.get("arch_kwargs") or {},
        data_path=local(data["upload_id"], "data.bin"), data_format=data.get("format"),
        eval_path=local(eval_data["upload_id"], "eval.bin") if eval_data else None,
        eval_format=eval_data.get("format") if eval_data else None,
        preprocess=Preprocess(size=pre.get("size"), channels=channels,
                              mean=pre.get("mean") or [0.0] * channels, std=pre.get("std") or [1.0] * channels),
        batch_size=opts.get("batch_size", 128), epochs=opts.get("epochs"), seed=opts.get("seed", 0),
        device=opts.get("device", "auto"), precision=opts.get("precision", "auto"),
        output_dir=workdir / "out",
    )
