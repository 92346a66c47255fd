"""Tenants and their API keys."""
from __future__ import annotations

import uuid

from ..auth import hash_key, new_key
from ..config import Settings
from ..db import repo
from ..db.models import ApiKey
from ..db.session import session_scope
from ..errors import ApiError


def _view(key: ApiKey, secret: str | None = None) -> dict:
    return {"id": key.id, "tenant": key.tenant_id, "prefix": key.prefix, "admin": key.is_admin,
            "created_at": key.created_at, "revoked_at": key.revoked_at, "key": secret}


def create_key(settings: Settings, request: dict) -> dict:
    secret = new_key()
    with session_scope(settings.resolved_database_url) as s:
        repo.ensure_tenant(s, request["tenant"], max_concurrent_jobs=request.get("max_concurrent_jobs"),
                           max_upload_bytes=request.get("max_upload_bytes"),
                           max_storage_bytes=request.get("max_storage_bytes"))
        key = ApiKey(id=str(uuid.uuid4()), tenant_id=request["tenant"], key_hash=hash_key(secret),
                     prefix=secret[:10], is_admin=request.get("admin", False))
        s.add(key)
        s.flush()
        return _view(key, secret)


def list_keys(settings: Settings) -> list[dict]:
    with session_scope(settings.resolved_database_url) as s:
        return [_view(k) for k in repo.list_api_keys(s)]


def revoke_key(settings: Settings, key_id: str) -> dict:
    with session_scope(settings.resolved_database_url) as s:
        key = repo.revoke_api_key(s, key_id)
        if key is None:
            raise ApiError("key_not_found", f"no API key {key_id!r}")
        s.flush()
        return _view(key)
