"""torch.compile of the adapted model: whether it pays for a job, and a safe way back to eager.

Compilation costs seconds to a minute before the first step and saves a fraction of each step after
it, so `auto` compiles only on CUDA and only for jobs long enough to repay it. Methods whose batches
change size from step to step (`dynamic_shapes`) would recompile at every new size, so `auto` leaves
them eager. A batch of another size than the job's (the last, partial one) runs eager rather than
compiling a second graph for one step. If compilation fails, the step's state is restored, the model
runs eager, and the job goes on: `report()` (metrics["compile"]) says which path ran and why.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from .device import synchronize

# Steps a job needs before `auto` compiles: compile time over the saving per step. Measured on one H200
# (BENCHMARKS.md, "GPU, 2026-11-29"): TENT on WRN-28-10, batch 200, bf16: 28 s to compile, 14.0 → 13.4 ms
# per step, so ~47,000 steps to break even.
COMPILE_MIN_STEPS = 50_000
BACKEND = "inductor"  # torch.compile's default; the tests use "aot_eager" (same tracing, no code generation)


class Compiling:
    def __init__(self, choice: str, device: torch.device, dynamic_shapes: bool, steps: int, batch_size: int):
        self.choice, self.batch_size = choice, batch_size
        if choice == "off":
            self.enabled, self.reason = False, "off in the job's options"
        elif choice == "on":
            self.enabled, self.reason = True, "on in the job's options"
        elif device.type != "cuda":
            self.enabled, self.reason = False, "auto: compiled only on CUDA"
        elif dynamic_shapes:
            self.enabled, self.reason = False, "auto: the method's batch shapes change every step"
        elif steps < COMPILE_MIN_STEPS:
            self.enabled, self.reason = False, f"auto: {steps} steps, fewer than the {COMPILE_MIN_STEPS} that repay it"
        else:
            self.enabled, self.reason = True, f"auto: {steps} steps"
        self.used = False
        self.first_step_seconds: float | None = None
        self.fallback: str | None = None
        self.model: nn.Module | None = None

    def apply(self, model: nn.Module) -> None:
        if self.enabled:
            model.compile(backend=BACKEND)  # in place: parameter names, state dicts and teachers' copies stay as they are
            self.model, self.used = model, True

    def adapt(self, method, x: torch.Tensor, index: torch.Tensor):
        if not self.used:
            return method.adapt(x, index)
        if x.shape[0] != self.batch_size:
            with torch.compiler.set_stance("force_eager"):
                return method.adapt(x, index)
        if self.first_step_seconds is not None:
            return method.adapt(x, index)
        state = method.snapshot()
        synchronize(x.device)
        t0 = time.perf_counter()
        try:
            out = method.adapt(x, index)
        except torch._dynamo.exc.TorchDynamoException as exc:  # compilation, not the step, failed
            method.restore(state)
            self.uncompile()
            self.fallback = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            out = method.adapt(x, index)
        synchronize(x.device)
        self.first_step_seconds = time.perf_counter() - t0
        return out

    def uncompile(self) -> None:
        """Back to eager for everything after adaptation (export, recalibration, evaluation in eval mode)."""
        if self.model is not None:
            self.model._compiled_call_impl = None  # what nn.Module.compile() set; eager calls check it
            self.model = None
            self.used = False

    def report(self) -> dict[str, Any]:
        return {"option": self.choice, "compiled": self.fallback is None and self.enabled,
                "reason": self.reason, "fallback": self.fallback,
                "first_step_seconds": self.first_step_seconds}
