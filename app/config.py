"""One typed settings object, read from ADAPTD_* environment variables and validated at start-up."""
from __future__ import annotations

from functools import cached_property, lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GiB = 1024**3


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADAPTD_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".adaptd",
                       description="Embedded database and local broker folders live here.")
    database_url: str | None = None   # default: sqlite file in `home`
    broker_url: str | None = None     # default: kombu filesystem transport in `home`
    queue: str = "adaptd"             # Celery queue name (tests isolate themselves with their own)

    # Access: "open" serves requests without a key as the `default` tenant (embedded, loopback only);
    # "keys" requires an API key on every /v1 request. Listening beyond loopback requires "keys".
    auth: Literal["open", "keys"] = "open"
    admin_key: SecretStr | None = None   # bootstrap admin credential: creates and revokes tenant keys
    # Per-tenant defaults (a tenant row may override each).
    tenant_max_concurrent_jobs: int = Field(16, ge=1)
    tenant_max_storage_bytes: int = Field(1024 * GiB, ge=1)

    max_upload_bytes: int = 20 * GiB
    chunk_bytes: int = 1024 * 1024    # blob chunk size in the database, and the streaming unit
    blob_dir: Literal["off"] | Path | None = Field(
        None, description="blob bytes (uploads, artifacts) go to content files in this absolute folder, which the "
        "API and every worker share, instead of chunk rows in the database (which keeps each blob's id, sha256 "
        "and size; blobs stored before stay readable). Unset: `home`/blobs in embedded mode (no "
        "ADAPTD_DATABASE_URL), chunk rows otherwise; `off`: chunk rows")
    # Leftovers of a crash (an unsealed blob row, a file under tmp/, a file whose row is gone) are swept
    # once older than this. It must exceed the longest legitimate write, or a live one would be swept
    # (it then fails at its seal, never leaves a dangling reference): an upload of the default
    # ADAPTD_MAX_UPLOAD_BYTES (20 GiB) from a 256 KiB/s client takes 23 h; artifacts are written in the
    # minutes after a job ends. Leftovers are rare, so waiting a day costs little space.
    blob_sweep_after_s: float = Field(24 * 3600, ge=60, description="age after which abandoned blob bytes "
                                      "(unsealed rows, temporary files, files without a row) are removed")
    blob_sweep_interval_s: float = Field(3600, gt=0, description="how often each worker sweeps abandoned blob "
                                         "bytes (it lists the blob folder: not every reaper round)")
    job_time_limit_s: int = 24 * 3600
    heartbeat_interval_s: float = 2.0
    worker_memory_limit_bytes: int | None = Field(None, ge=0, description="data-segment cap (RLIMIT_DATA) "
                                                  "per worker pool process; unset: half the host's memory; 0: off")
    artifact_dir: Path | None = None  # worker scratch space; default: system temp
    max_attempts: int = Field(3, ge=1, le=100, description="a job whose worker is lost this many times fails "
                              "with worker_lost instead of looping forever")
    stale_after_s: float | None = None  # heartbeat age that marks a running job's worker as lost
    reaper_interval_s: float = 30.0
    reaper_queued_after_s: float = 600.0  # re-enqueue a job still queued after this long (lost enqueue)
    unrunnable_after_s: float = Field(30.0, gt=0, description="a job still queued after this long while the "
                                      "live workers cannot run jobs (e.g. torch missing) fails with "
                                      "no_capable_worker")

    api_workers: int = Field(1, ge=1, le=64, description="API processes that `adaptd api` and `adaptd up` "
                             "serve one port with (uvicorn workers). Each has its own database pools and its own "
                             "shared reads: one process batches concurrent polls best (BENCHMARKS.md)")

    # --- live progress (SSE) and notifications -------------------------------------------------
    events_poll_s: float = Field(0.5, gt=0, le=10, description="how often each API process polls the database "
                                 "for the jobs its SSE streams watch (one statement for all of them)")
    events_max_s: float = Field(600.0, gt=0, description="an SSE connection ends after this long; clients "
                                "reconnect with Last-Event-ID")
    events_keepalive_s: float = 15.0
    webhook_secret: SecretStr | None = Field(None, description="HMAC-SHA256 key of the notify_url webhook "
                                             "signature (X-Adaptd-Signature); unset: unsigned")
    webhook_attempts: int = Field(4, ge=1, le=10)
    webhook_timeout_s: float = Field(5.0, gt=0, le=60)
    webhook_backoff_s: float = Field(1.0, ge=0, le=60, description="first retry delay; doubles each time")

    # --- bounds on what a tenant sends (issue 13) ----------------------------------------------
    max_request_bytes: int = Field(64 * 1024, ge=1024, description="JSON request bodies (job specs, admin "
                                   "calls); uploads have their own limit")
    max_json_depth: int = Field(32, ge=4, le=1000)
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="per image in a dataset archive "
                                  "(Pillow's own default is 89 M)")
    max_preprocess_size: int = Field(512, ge=4, le=4096, description="largest preprocess.size a job may ask for")
    # notify_url targets in private/loopback/link-local space are refused unless listed here
    # (comma-separated CIDRs or host names), e.g. "10.1.2.0/24,hooks.internal".
    webhook_allowed_hosts: str = ""
    metrics_token: SecretStr | None = Field(None, description="bearer token for GET /metrics in keys mode "
                                            "(the admin key works too)")
    session_ttl_s: int = Field(3600, ge=60, le=7 * 24 * 3600, description="dashboard sign-in cookie lifetime")

    @field_validator("blob_dir", mode="before")
    @classmethod
    def _blob_dir_unset(cls, value):
        return None if value == "" else value  # ADAPTD_BLOB_DIR= (empty) is unset, not the current folder

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.chunk_bytes < 64 * 1024 or self.chunk_bytes > 64 * 1024 * 1024:
            raise ValueError("ADAPTD_CHUNK_BYTES must lie between 64 KiB and 64 MiB")
        if self.max_upload_bytes <= 0:
            raise ValueError("ADAPTD_MAX_UPLOAD_BYTES must be positive")
        if isinstance(self.blob_dir, Path) and not self.blob_dir.is_absolute():
            raise ValueError("ADAPTD_BLOB_DIR must be an absolute path (or off)")
        return self

    @property
    def embedded(self) -> bool:
        return self.database_url is None or self.broker_url is None

    # Read on every request: a path join and str() each time were 20 % of an embedded poll's CPU samples.
    @cached_property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'adaptd.db'}"

    @property
    def resolved_blob_dir(self) -> Path | None:
        """Where new blobs' bytes go; None: chunk rows (app/storage)."""
        if self.blob_dir is None:
            return self.home / "blobs" if self.database_url is None else None
        return None if self.blob_dir == "off" else self.blob_dir

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://localhost/"  # a host: kombu warns about none otherwise

    @property
    def broker_folder(self) -> Path:
        return self.home / "broker"

    @property
    def resolved_stale_after_s(self) -> float:
        return self.stale_after_s or max(10.0, 5 * self.heartbeat_interval_s)

    @property
    def resolved_worker_memory_limit_bytes(self) -> int | None:
        if self.worker_memory_limit_bytes is not None:
            return self.worker_memory_limit_bytes or None
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2

    @property
    def visibility_timeout_s(self) -> int:
        # Longer than the longest job, or Redis redelivers a running job to a second worker.
        return self.job_time_limit_s + 3600


@lru_cache
def get_settings() -> Settings:
    return Settings()
