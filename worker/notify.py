"""Job-finished webhooks: when a job whose spec has `notify_url` reaches a terminal state, the worker
POSTs the job's final state (the JSON of `GET /v1/jobs/{id}`) to that URL.

- Signed: `X-Adaptd-Signature: sha256=<hex>`, HMAC-SHA256 of the raw body with `ADAPTD_WEBHOOK_SECRET`
  (no header when the secret is unset). Receivers compare with `hmac.compare_digest`.
- At most once per job: the delivery is claimed in the database (`jobs.notified_at`) before it is sent,
  so a redelivered task message or a second worker never sends it twice.
- Only to public addresses (app/netguard.py; ADAPTD_WEBHOOK_ALLOWED_HOSTS for internal hooks): the
  host is resolved once per delivery and every attempt connects to that checked address (the name goes
  in `Host` and TLS SNI), never to a fresh lookup; redirects are not followed.
- Retried with exponential backoff on connection errors, timeouts, 408, 425, 429 and 5xx
  (`ADAPTD_WEBHOOK_ATTEMPTS`, `ADAPTD_WEBHOOK_BACKOFF_S` doubling, `ADAPTD_WEBHOOK_TIMEOUT_S` per try),
  in a background thread of the worker process, so the next job starts at once; a failure is logged
  and never changes the job (a delivery still pending when the worker process exits is lost).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
import uuid
from urllib.parse import urlsplit, urlunsplit
from concurrent.futures import Future, ThreadPoolExecutor

import httpx

from app.config import Settings
from app.db import repo
from app.db.session import session_scope
from app.netguard import NotAllowed, check_url

log = logging.getLogger("adaptd.notify")

SIGNATURE_HEADER = "X-Adaptd-Signature"
USER_AGENT = "adaptd-webhook/1"


def sign(secret: str, body: bytes) -> str:
    """The value of the X-Adaptd-Signature header for `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str | None) -> bool:
    """What a receiver does: constant-time comparison of the header with the expected signature."""
    return bool(header) and hmac.compare_digest(sign(secret, body), header)


def _pinned(url: str, addr) -> tuple[str, dict, dict]:
    """(URL naming the checked address, Host header, httpx extensions with the TLS server name)."""
    parts = urlsplit(url)
    ip = f"[{addr}]" if addr.version == 6 else str(addr)
    netloc = ip if parts.port is None else f"{ip}:{parts.port}"
    return (urlunsplit(parts._replace(netloc=netloc)), {"Host": parts.netloc.rsplit("@", 1)[-1]},
            {"sni_hostname": parts.hostname} if parts.scheme == "https" else {})


def deliver(url: str, body: bytes, secret: str | None, *, attempts: int = 4, timeout_s: float = 5.0,
            backoff_s: float = 1.0, headers: dict | None = None, sleep=time.sleep, allowed: str = "") -> bool:
    """POST `body` to `url`, retrying transient failures with exponential backoff. Returns whether a
    2xx answer came back. Never raises. `allowed`: ADAPTD_WEBHOOK_ALLOWED_HOSTS."""
    try:
        target, host, extensions = _pinned(url, check_url(url, allowed)[0])
    except NotAllowed as exc:
        log.warning("webhook %s refused: %s", url, exc)
        return False
    hdrs = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
            "X-Adaptd-Delivery": str(uuid.uuid4()), **host, **(headers or {})}
    if secret:
        hdrs[SIGNATURE_HEADER] = sign(secret, body)
    delay = backoff_s
    for attempt in range(1, attempts + 1):
        try:
            with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as http:
                r = http.post(target, content=body, headers=hdrs, extensions=extensions)
            if 200 <= r.status_code < 300:
                log.info("webhook %s delivered (attempt %d, HTTP %d)", url, attempt, r.status_code)
                return True
            transient = r.status_code in (408, 425, 429) or r.status_code >= 500
            reason = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            transient, reason = True, f"{type(exc).__name__}: {exc}"[:200]
        except Exception as exc:  # noqa: BLE001 - a webhook must never break the worker
            transient, reason = False, f"{type(exc).__name__}: {exc}"[:200]
        if not transient or attempt == attempts:
            log.warning("webhook %s failed after %d attempt(s): %s", url, attempt, reason)
            return False
        log.info("webhook %s attempt %d failed (%s); retrying in %.1f s", url, attempt, reason, delay)
        sleep(delay)
        delay *= 2
    return False


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _background() -> ThreadPoolExecutor:
    """Deliveries run beside the worker's jobs: a slow or dead receiver never holds a GPU idle. Created
    lazily, so in the (forked) process that delivers."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="adaptd-webhook")
        return _executor


def notify_if_finished(settings: Settings, job_id: str, wait: bool = False) -> Future | bool | None:
    """Called by the worker after a job's final transaction (and for messages of jobs that are already
    finished, e.g. cancelled while queued). When the job is terminal, has a `notify_url`, and nobody
    claimed its webhook yet: claims it and delivers it in a background thread (returns the Future), or
    here with `wait=True` (returns whether it was delivered). None when there is nothing to send. Never
    raises."""
    from app.db.views import to_out  # the same JSON as GET /v1/jobs/{id}

    try:
        with session_scope(settings.resolved_database_url) as s:
            job = repo.get_job(s, job_id)
            if job is None or job.status not in repo.TERMINAL:
                return None
            url = (job.spec or {}).get("notify_url")
            if not url or not repo.claim_notification(s, job_id):
                return None
            body = to_out(job, repo.artifacts_of(s, job_id)).model_dump_json().encode()
            status = job.status
    except Exception:  # noqa: BLE001 - database trouble: log, never fail the job
        log.warning("could not prepare the webhook of job %s", job_id, exc_info=True)
        return None
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    args = (url, body, secret)
    kwargs = dict(attempts=settings.webhook_attempts, timeout_s=settings.webhook_timeout_s,
                  backoff_s=settings.webhook_backoff_s, allowed=settings.webhook_allowed_hosts,
                  headers={"X-Adaptd-Event": f"job.{status}", "X-Adaptd-Job-Id": job_id})
    if wait:
        return deliver(*args, **kwargs)
    try:
        return _background().submit(deliver, *args, **kwargs)
    except RuntimeError:  # interpreter shutting down
        return deliver(*args, **kwargs)
