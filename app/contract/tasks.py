"""Task names: what a model predicts. A job has one (`JobSpec.task`), an architecture declares its own
(`architectures.ARCHITECTURES`), a method the ones it supports (`catalog.MethodInfo.tasks`); the API
refuses a mismatch at submit. The engine's side of each task is `worker/adaptation/tasks/<name>.py`."""
from __future__ import annotations

from typing import Literal, get_args

Task = Literal["classification", "segmentation", "detection"]
TASKS: tuple[str, ...] = get_args(Task)
DEFAULT_TASK: Task = "classification"
