"""Dashboard sign-in: the key is POSTed once (a form, never a URL) and exchanged for a short-lived
HttpOnly, SameSite=Strict session cookie (app/auth.py), which fetch, EventSource and download links
then send by themselves."""
from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..auth import SESSION_COOKIE, resolve, session_token
from ..errors import ApiError
from .deps import SettingsDep

router = APIRouter(prefix="/v1/session", tags=["session"])


class SignIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    api_key: str = Field(..., min_length=1, max_length=200)


@router.post("", status_code=204)
async def sign_in(body: SignIn, request: Request, settings: SettingsDep) -> Response:
    if settings.auth != "keys":
        raise ApiError("validation_error", "this server runs without keys: there is nothing to sign in to")
    await run_in_threadpool(resolve, settings, body.api_key)  # 401 for unknown or revoked keys
    response = Response(status_code=204)
    response.set_cookie(SESSION_COOKIE, session_token(settings, body.api_key), max_age=settings.session_ttl_s,
                        httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/")
    return response


@router.delete("", status_code=204)
async def sign_out() -> Response:
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response
