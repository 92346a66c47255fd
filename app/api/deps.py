from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..auth import Principal, principal_of
from ..config import Settings, get_settings


async def _settings() -> Settings:
    # async: FastAPI runs a plain-def dependency in the threadpool, a thread hand-off per request
    return get_settings()


SettingsDep = Annotated[Settings, Depends(_settings)]


async def _principal(request: Request, settings: SettingsDep) -> Principal:
    return await principal_of(request, settings)


PrincipalDep = Annotated[Principal, Depends(_principal)]

