"""The worker's Celery app: the shared configuration (app.queue) plus the task implementations.

Start with `adaptd worker` (or `celery -A worker.celery_app worker`). One worker process per GPU:
the prefork parent never touches CUDA, each child imports torch and initialises the device itself.
"""
from __future__ import annotations

from app.config import get_settings
from app.queue import make_celery

celery_app = make_celery(get_settings())
celery_app.conf.update(include=["worker.tasks"])
app = celery_app  # `celery -A worker.celery_app` looks for `app`


def _start_reaper(**_kwargs) -> None:
    from .reaper import Reaper

    Reaper(get_settings(), celery_app).start()


# The reaper runs in the worker's main process (database and broker calls only, never CUDA).
from celery.signals import worker_ready  # noqa: E402

worker_ready.connect(_start_reaper, weak=False)


def _limit_child_memory(**_kwargs) -> None:
    """Cap each pool process's data segment (ADAPTD_WORKER_MEMORY_LIMIT_BYTES, on by default): a job that
    asks for too much host memory then fails with `out_of_memory` instead of waking the kernel's OOM
    killer. RLIMIT_DATA, not RLIMIT_AS: CUDA reserves tens of GB of address space it never touches, so
    an address-space cap would break GPU workers; the data limit counts only writable private memory."""
    import resource

    limit = get_settings().resolved_worker_memory_limit_bytes
    if limit:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


from celery.signals import worker_process_init  # noqa: E402

def _prepare_child(**_kwargs) -> None:
    """Each pool process imports torch and the engine when it starts, before any job's time limit runs:
    an import cut short by a job's soft time limit would leave torch half-initialised in this process,
    and the next job would fail on it. Then the memory cap (the import itself needs ~0.8 GB)."""
    import worker.adaptation.runner  # noqa: F401

    _limit_child_memory()


worker_process_init.connect(_prepare_child, weak=False)
