"""`options.compile`: the adapted model compiled with torch.compile runs the same adaptation as eager,
the last partial batch runs eager, the exported weights load as usual, and `auto` stays eager on a CPU."""
from __future__ import annotations

import pytest
import torch

from worker.adaptation import compiling
from worker.adaptation.compiling import Compiling
from worker.adaptation.runner import RunRequest, run

from .conftest import CNN_KWARGS, PRE


def _run(run_files, out, compile_choice: str):
    req = RunRequest.for_files(run_files / "model.safetensors", run_files / "target.npz", out, method="tent",
                               model={"architecture": "digit_cnn", "arch_kwargs": CNN_KWARGS, "num_classes": 10},
                               preprocess=vars(PRE), eval_path=run_files / "target.npz",
                               options={"batch_size": 40, "device": "cpu", "precision": "fp32",
                                        "compile": compile_choice})
    return run(req)


def test_compiled_tent_matches_eager(run_files, tmp_path, monkeypatch):
    # dynamo's tracing and AOT autograd as inductor gets them, without its C++ code generation (a minute
    # on two cores); benchmarks/gpu_throughput.py --precisions bf16-cl-compile measures inductor itself
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    eager = _run(run_files, tmp_path / "eager", "off")
    compiled = _run(run_files, tmp_path / "compiled", "on")
    assert eager.metrics["compile"]["compiled"] is False
    report = compiled.metrics["compile"]
    assert report["compiled"] is True and report["fallback"] is None and report["first_step_seconds"] > 0
    # 96 images in batches of 40: two compiled steps and a partial batch of 16 that runs eager
    assert compiled.metrics["timing"]["steps"] == 3
    e = [r["entropy"] for r in eager.history["steps"]]
    c = [r["entropy"] for r in compiled.history["steps"]]
    assert c == pytest.approx(e, rel=1e-3, abs=1e-4)
    assert compiled.metrics["accuracy_after"] == pytest.approx(eager.metrics["accuracy_after"], abs=1 / 96)


def test_auto_is_eager_off_cuda_and_for_short_or_dynamic_jobs():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not Compiling("auto", cpu, False, 10**6, 200).enabled
    assert not Compiling("auto", cuda, True, 10**6, 200).enabled
    assert not Compiling("auto", cuda, False, 10, 200).enabled
    assert Compiling("auto", cuda, False, 10**6, 200).enabled
    assert Compiling("on", cpu, True, 1, 200).enabled and not Compiling("off", cuda, False, 10**6, 200).enabled


def test_failed_compilation_falls_back_to_eager(run_files, tmp_path, monkeypatch):
    """A backend that cannot compile: the step's state is restored, the job runs eager and says why."""
    def broken_compile(self, *args, **kwargs):
        def failing(*a, **k):
            raise torch._dynamo.exc.BackendCompilerFailed(lambda *x: None, RuntimeError("no compiler"), None)
        self._compiled_call_impl = failing

    monkeypatch.setattr(torch.nn.Module, "compile", broken_compile)
    eager = _run(run_files, tmp_path / "eager", "off")
    fell_back = _run(run_files, tmp_path / "fallback", "on")
    report = fell_back.metrics["compile"]
    assert report["compiled"] is False and report["fallback"].startswith("BackendCompilerFailed")
    assert [r["entropy"] for r in fell_back.history["steps"]] == \
        pytest.approx([r["entropy"] for r in eager.history["steps"]], rel=1e-5)
