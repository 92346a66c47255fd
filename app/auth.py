"""Who is calling: API keys (stored as sha256) mapped to tenants, and the admin credential.

Every upload, job and artifact belongs to a tenant; another tenant's ids answer 404, exactly as ids
that do not exist (no existence oracle).

Keys travel in headers only (`Authorization: Bearer`, `X-API-Key`), never in URLs, which end up in
access logs, proxies and browser history. The dashboard signs in once (POST /v1/session) and then
holds a session cookie: HttpOnly, SameSite=Strict, ADAPTD_SESSION_TTL_S long, carrying the key's
sha256 (not the key) and an expiry, signed with a secret derived from the admin key. Revoking the key
ends its sessions; changing the admin key ends all of them."""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import socket
import time
from dataclasses import dataclass

from fastapi import Request
from starlette.requests import cookie_parser

from .config import Settings
from .db import repo
from .db.batched import Batched, per_loop
from .db.models import DEFAULT_TENANT
from .db.session import session_scope
from .errors import ApiError

KEY_PREFIX = "adk_"
SESSION_COOKIE = "adaptd_session"


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    is_admin: bool = False
    key_id: str | None = None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def presented_credentials(request: Request) -> tuple[str | None, str | None]:
    """(the API key, the dashboard session cookie) a request presents, in one pass over its raw
    headers (the first authorization header counts, as with `request.headers.get`; cookies from every
    cookie header, as `request.cookies`): every request of the hot path asks, so it does not build
    Starlette's header and cookie mappings for it."""
    auth = api_key = None
    cookies: list[str] = []
    for name, value in request.scope["headers"]:
        if name == b"authorization" and auth is None:
            auth = value.decode("latin-1")
        elif name == b"x-api-key" and api_key is None:
            api_key = value.decode("latin-1")
        elif name == b"cookie":
            cookies.append(value.decode("latin-1"))
    if auth is not None and auth.lower().startswith("bearer "):
        key = auth[7:].strip() or None
    else:
        key = api_key or None
    session = None
    for cookie in cookies:
        session = cookie_parser(cookie).get(SESSION_COOKIE, session)
    return key, session


def presented_key(request: Request) -> str | None:
    return presented_credentials(request)[0]


def _is_admin_hash(settings: Settings, key_hash: str) -> bool:
    return settings.admin_key is not None and hmac.compare_digest(
        key_hash, hash_key(settings.admin_key.get_secret_value()))


def _principal_for_hash(settings: Settings, key_hash: str) -> Principal:
    if _is_admin_hash(settings, key_hash):
        return Principal(DEFAULT_TENANT, is_admin=True)
    with session_scope(settings.resolved_database_url) as s:
        return _principal_for_row(repo.get_api_key_by_hash(s, key_hash))


def _principal_for_row(row) -> Principal:
    if row is None or row.revoked_at is not None:
        raise ApiError("invalid_api_key", "the API key is unknown or revoked")
    return Principal(row.tenant_id, is_admin=row.is_admin, key_id=row.id)


def resolve(settings: Settings, key: str | None, session: str | None = None) -> Principal:
    if key is not None:
        return _principal_for_hash(settings, hash_key(key))
    if session is not None and settings.auth == "keys":
        key_hash = _session_key_hash(settings, session)
        if key_hash is not None:
            return _principal_for_hash(settings, key_hash)
    if settings.auth == "open":
        return Principal(DEFAULT_TENANT)
    raise ApiError("missing_api_key", "this server requires an API key: send `Authorization: Bearer <key>` "
                   "(the dashboard signs in with a form)")


async def principal_of(request: Request, settings: Settings) -> Principal:
    """`resolve` for a request, on the event loop: the key's row is read with those of the requests
    waiting at the same time, in one statement (app.db.batched: every answer from a read that started
    after its request arrived, so a revoked key is refused from the next request on, in every process)."""
    key, session = presented_credentials(request)
    if key is not None:
        key_hash = hash_key(key)
    elif session is not None and settings.auth == "keys":
        key_hash = _session_key_hash(settings, session)
    else:
        key_hash = None
    if key_hash is None:
        return resolve(settings, None)  # open access or missing_api_key: no database involved
    if _is_admin_hash(settings, key_hash):
        return Principal(DEFAULT_TENANT, is_admin=True)
    url = settings.resolved_database_url
    row = await per_loop(("api_keys", url), lambda: Batched(url, repo.api_keys_by_hash)).get(key_hash)
    return _principal_for_row(row)


# --- dashboard sessions ------------------------------------------------------------------------------

def _session_mac(settings: Settings, payload: str) -> str:
    secret = hashlib.sha256(b"adaptd-session\0" + settings.admin_key.get_secret_value().encode()).digest()
    return hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()


def session_token(settings: Settings, key: str) -> str:
    """A signed session value for `key` (checked first with resolve): expiry and the key's sha256."""
    payload = f"{int(time.time()) + settings.session_ttl_s}.{hash_key(key)}"
    return f"{payload}.{_session_mac(settings, payload)}"


def _session_key_hash(settings: Settings, token: str) -> str | None:
    """The key hash a valid, unexpired session carries; None otherwise."""
    try:
        expires, key_hash, mac = token.split(".")
        fresh = int(expires) > time.time()
    except ValueError:
        return None
    ok = settings.admin_key is not None and hmac.compare_digest(mac, _session_mac(settings, f"{expires}.{key_hash}"))
    return key_hash if ok and fresh else None


def require_admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise ApiError("admin_required", "this operation needs the admin key")


def is_loopback(host: str) -> bool:
    """An explicit loopback address (127.0.0.0/8, ::1), or `localhost` when every address it resolves
    to is one. "" (all interfaces to uvicorn), 0.0.0.0 and [::] are not."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if host.lower() != "localhost":
        return False
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%", 1)[0]).is_loopback for a in addrs)


def check_bind_allowed(settings: Settings, host: str) -> None:
    """Refuse to serve open (key-less) access anywhere but loopback."""
    if settings.auth == "open" and not is_loopback(host):
        raise SystemExit(f"adaptd: refusing to listen on {host} without API keys; set ADAPTD_AUTH=keys and "
                         "ADAPTD_ADMIN_KEY (or listen on 127.0.0.1)")
    if settings.auth == "keys" and settings.admin_key is None:
        raise SystemExit("adaptd: ADAPTD_AUTH=keys needs ADAPTD_ADMIN_KEY to create the first tenant keys")
