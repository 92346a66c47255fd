"""create_app(): the FastAPI application. No torch is imported on this side."""
from __future__ import annotations

from fastapi import FastAPI

from .api import admin, dashboard, docs, events, health, jobs, logs, methods, observability, session, uploads
from .bodylimit import BodyLimit
from .errors import install_error_handlers


def create_app() -> FastAPI:
    app = FastAPI(title="adaptd", version="0.1.0",
                  description="Test-time adaptation and source-free domain adaptation as a service.",
                  docs_url=None, redoc_url=None,  # app/api/docs.py serves both without a CDN
                  # FastAPI's OpenTelemetry hooks look the providers up on every request; adaptd exports
                  # Prometheus metrics (GET /metrics) and configures no OpenTelemetry provider.
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    install_error_handlers(app)
    app.add_middleware(BodyLimit)
    app.include_router(jobs.hot)  # first: the most requested route is matched first
    for module in (uploads, jobs, events, logs, methods, admin, session, health, observability, dashboard, docs):
        app.include_router(module.router)
    return app
