from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Response
from pydantic import BaseModel

from ..auth import Principal, principal_of
from ..config import Settings, get_settings


async def _settings() -> Settings:
    # async: FastAPI runs a plain-def dependency in the threadpool, a thread hand-off per request
    return get_settings()


SettingsDep = Annotated[Settings, Depends(_settings)]


async def _principal(request: Request, settings: SettingsDep) -> Principal:
    return await principal_of(request, settings)


PrincipalDep = Annotated[Principal, Depends(_principal)]


def json_response(model: BaseModel, status_code: int = 200) -> Response:
    """The model's JSON as the response, serialized once: returned as a Response, FastAPI skips
    re-validating it against the route's response_model (which still documents it)."""
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")
