# syntax=docker/dockerfile:1
# Two targets from one source tree:
#   api    - FastAPI + the torch-free contract (app/contract: catalogue, architectures, JobSpec) (slim; also runs `alembic upgrade head`)
#   worker - Celery worker with PyTorch (CUDA build from PyPI), one process per GPU
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ALEMBIC_CONFIG=/srv/adaptd/pyproject.toml
WORKDIR /srv/adaptd
RUN useradd --create-home --uid 10001 adaptd \
 && mkdir -p /var/lib/adaptd/blobs && chown adaptd:adaptd /var/lib/adaptd/blobs
# ADAPTD_BLOB_DIR in docker-compose.yml: a new named volume mounted here copies this folder's owner
COPY pyproject.toml README.md ./
COPY app ./app
COPY migrations ./migrations

FROM base AS api
RUN pip install ".[server]"
USER adaptd
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=5 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
CMD ["adaptd", "api", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS worker
# Only the worker image holds the engine: the API never imports `worker` (tests/test_import_direction.py).
COPY worker ./worker
# torch>=2.10 from PyPI is the CUDA build; the prefork parent never initialises CUDA.
RUN pip install ".[worker]"
USER adaptd
CMD ["adaptd", "worker", "--concurrency", "1"]
