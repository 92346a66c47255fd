"""The Celery app, configured from settings. Torch-free: the API only sends task names; the worker
(worker/celery_app.py) registers the task implementations on the same configuration."""
from __future__ import annotations

from functools import lru_cache

from celery import Celery

from .config import Settings, get_settings

RUN_JOB_TASK = "adaptd.run_job"


def make_celery(settings: Settings) -> Celery:
    broker = settings.resolved_broker_url
    app = Celery("adaptd", broker=broker)
    transport_options: dict = {}
    if broker.startswith("filesystem"):
        # Embedded: one folder is both the producer's out-box and the consumer's in-box.
        folder = settings.broker_folder / settings.queue
        (settings.broker_folder / "processed").mkdir(parents=True, exist_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        transport_options = {"data_folder_in": str(folder), "data_folder_out": str(folder),
                             "processed_folder": str(settings.broker_folder / "processed"),
                             "control_folder": str(settings.broker_folder / "control"),
                             "store_processed": False,
                             "polling_interval": 0.1}  # default 1 s: a second of latency per job
    elif broker.startswith(("redis", "rediss")):
        # Longer than the longest job: Redis redelivers unacked messages after this long.
        transport_options = {"visibility_timeout": settings.visibility_timeout_s}
    app.conf.update(
        task_acks_late=True,                # ack after the job ends, so a dead worker's job is redelivered
        task_reject_on_worker_lost=True,    # ... including when the child process is killed
        worker_prefetch_multiplier=1,       # a GPU worker holds one job, never a backlog
        task_default_queue=settings.queue,
        task_ignore_result=True,            # durable state lives in the database, not in a result backend
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        task_soft_time_limit=settings.job_time_limit_s,
        task_time_limit=settings.job_time_limit_s + 120,
        worker_hijack_root_logger=False,
        worker_proc_alive_timeout=120,      # a pool process imports torch before it reports ready (4 s default)
        worker_send_task_events=False,
    )
    return app


@lru_cache
def get_celery() -> Celery:
    return make_celery(get_settings())


def enqueue_job(celery: Celery, job_id: str, queue: str) -> None:
    celery.send_task(RUN_JOB_TASK, args=[job_id], queue=queue,
                     retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})
