from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..auth import Principal, principal_of
from ..config import Settings, get_settings

SettingsDep = Annotated[Settings, Depends(get_settings)]


async def _principal(request: Request, settings: SettingsDep) -> Principal:
    return await principal_of(request, settings)


PrincipalDep = Annotated[Principal, Depends(_principal)]
