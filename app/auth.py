"""Who is calling: API keys (stored as sha256) mapped to tenants, and the admin credential.

Every upload, job and artifact belongs to a tenant; another tenant's ids answer 404, exactly as ids
that do not exist (no existence oracle)."""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from .config import Settings
from .db import repo
from .db.models import DEFAULT_TENANT
from .db.session import session_scope
from .errors import ApiError

KEY_PREFIX = "adk_"


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    is_admin: bool = False
    key_id: str | None = None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    # EventSource (the dashboard's live view) cannot set headers: a query parameter on GETs only.
    key = request.headers.get("x-api-key") or (request.query_params.get("api_key") if request.method == "GET" else None)
    return key or None


def _is_admin_key(settings: Settings, key: str) -> bool:
    return settings.admin_key is not None and hmac.compare_digest(
        hash_key(key), hash_key(settings.admin_key.get_secret_value()))


def resolve(settings: Settings, key: str | None) -> Principal:
    if key is None:
        if settings.auth == "open":
            return Principal(DEFAULT_TENANT)
        raise ApiError("missing_api_key", "this server requires an API key: send `Authorization: Bearer <key>`")
    if _is_admin_key(settings, key):
        return Principal(DEFAULT_TENANT, is_admin=True)
    with session_scope(settings.resolved_database_url) as s:
        row = repo.get_api_key_by_hash(s, hash_key(key))
    if row is None or row.revoked_at is not None:
        raise ApiError("invalid_api_key", "the API key is unknown or revoked")
    return Principal(row.tenant_id, is_admin=row.is_admin, key_id=row.id)


async def principal_of(request: Request, settings: Settings) -> Principal:
    key = presented_key(request)
    if key is None:  # no database involved: answered here, without a trip through the threadpool
        return resolve(settings, None)
    return await run_in_threadpool(resolve, settings, key)


def require_admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise ApiError("admin_required", "this operation needs the admin key")


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind_allowed(settings: Settings, host: str) -> None:
    """Refuse to serve open (key-less) access anywhere but loopback."""
    if settings.auth == "open" and not is_loopback(host):
        raise SystemExit(f"adaptd: refusing to listen on {host} without API keys; set ADAPTD_AUTH=keys and "
                         "ADAPTD_ADMIN_KEY (or listen on 127.0.0.1)")
    if settings.auth == "keys" and settings.admin_key is None:
        raise SystemExit("adaptd: ADAPTD_AUTH=keys needs ADAPTD_ADMIN_KEY to create the first tenant keys")
