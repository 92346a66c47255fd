"""create_app(): the FastAPI application. No torch is imported on this side."""
from __future__ import annotations

import gc
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .api import admin, dashboard, docs, events, health, jobs, logs, methods, observability, session, uploads
from .api.hotpath import JobPoll
from .bodylimit import BodyLimit
from .errors import install_error_handlers


@asynccontextmanager
async def _lifespan(_app: FastAPI):
    # What start-up loaded (modules, routes, schemas, the catalogue: ~130,000 objects) lives as long as
    # the process. Frozen, it is out of the collector's way: a full collection walked all of it, ~100 ms
    # on a busy 2-core machine, several times a second under 200 pollers (BENCHMARKS.md: most of p99).
    gc.collect()
    gc.freeze()
    yield


def create_app() -> FastAPI:
    app = FastAPI(title="adaptd", version="0.1.0", lifespan=_lifespan,
                  description="Test-time adaptation and source-free domain adaptation as a service.",
                  docs_url=None, redoc_url=None,  # app/api/docs.py serves both without a CDN
                  # FastAPI's OpenTelemetry hooks look the providers up on every request; adaptd exports
                  # Prometheus metrics (GET /metrics) and configures no OpenTelemetry provider.
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    install_error_handlers(app)
    app.add_middleware(BodyLimit)
    app.add_middleware(JobPoll)  # added last: outside BodyLimit and the routing (app/api/hotpath.py)
    for module in (uploads, jobs, events, logs, methods, admin, session, health, observability, dashboard, docs):
        app.include_router(module.router)
    return app
