"""The engine's side of each task (app/contract/tasks.py names them): what the runner needs to know about
a model's output to predict, check inputs, score, recalibrate, evaluate and watch for collapse. A new task
is one module here and one line below; tests/engine/test_registries.py keeps this equal to the contract."""
from __future__ import annotations

from .base import TaskEngine
from .classification import Classification
from .detection import Detection
from .segmentation import Segmentation

TASK_IMPLEMENTATIONS: dict[str, TaskEngine] = {
    "classification": Classification(),
    "segmentation": Segmentation(),
    "detection": Detection(),
}


def get_task(name: str) -> TaskEngine:
    try:
        return TASK_IMPLEMENTATIONS[name]
    except KeyError:
        raise KeyError(f"no engine for task {name!r}; known: {', '.join(sorted(TASK_IMPLEMENTATIONS))}") from None


__all__ = ["TASK_IMPLEMENTATIONS", "TaskEngine", "get_task"]
