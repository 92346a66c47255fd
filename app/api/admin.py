"""Admin: create and revoke tenant API keys (admin key only)."""
from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..auth import require_admin
from ..services import tenants as service
from .deps import PrincipalDep, SettingsDep

router = APIRouter(prefix="/v1/admin", tags=["admin"])


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    admin: bool = False
    max_concurrent_jobs: int | None = Field(None, ge=1)
    max_upload_bytes: int | None = Field(None, ge=1)
    max_storage_bytes: int | None = Field(None, ge=1)


class KeyOut(BaseModel):
    id: str
    tenant: str
    prefix: str
    admin: bool
    created_at: datetime
    revoked_at: datetime | None
    key: str | None = Field(None, description="the secret, returned once at creation")


@router.post("/keys", status_code=201, response_model=KeyOut)
async def create_key(body: KeyRequest, settings: SettingsDep, who: PrincipalDep) -> KeyOut:
    require_admin(who)
    return KeyOut(**await run_in_threadpool(service.create_key, settings, body.model_dump()))


@router.get("/keys", response_model=list[KeyOut])
async def list_keys(settings: SettingsDep, who: PrincipalDep) -> list[KeyOut]:
    require_admin(who)
    return [KeyOut(**k) for k in await run_in_threadpool(service.list_keys, settings)]


@router.delete("/keys/{key_id}", response_model=KeyOut)
async def revoke_key(key_id: str, settings: SettingsDep, who: PrincipalDep) -> KeyOut:
    require_admin(who)
    return KeyOut(**await run_in_threadpool(service.revoke_key, settings, key_id))
