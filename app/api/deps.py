from __future__ import annotations

import inspect
from typing import Annotated

from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute

from ..auth import Principal, principal_of
from ..config import Settings, get_settings


async def _settings() -> Settings:
    # async: FastAPI runs a plain-def dependency in the threadpool, a thread hand-off per request
    return get_settings()


SettingsDep = Annotated[Settings, Depends(_settings)]


async def _principal(request: Request, settings: SettingsDep) -> Principal:
    return await principal_of(request, settings)


PrincipalDep = Annotated[Principal, Depends(_principal)]


class PlainRoute(APIRoute):
    """A hot route called without FastAPI's per-request dependency resolution (which cost more CPU than
    the rest of `GET /v1/jobs/{id}` together). Its endpoint may take only `str` path parameters,
    `who: PrincipalDep` and `request: Request`, and returns a Response; anything else is refused when the
    route is built. The OpenAPI schema still comes from the endpoint's signature, as for any route."""

    def get_route_handler(self):
        endpoint = self.endpoint
        params = inspect.signature(endpoint, eval_str=True).parameters
        path = [name for name in params if name in self.param_convertors]
        for name, p in params.items():
            allowed = {"who": PrincipalDep, "request": Request}.get(name, str if name in path else None)
            if allowed is None or p.annotation != allowed:
                raise TypeError(f"PlainRoute {self.path}: parameter {name}: {p.annotation} is not supported")
        wants_who, wants_request = "who" in params, "request" in params

        async def handler(request: Request) -> Response:
            kwargs = {name: request.path_params[name] for name in path}
            if wants_who:
                kwargs["who"] = await principal_of(request, get_settings())
            if wants_request:
                kwargs["request"] = request
            return await endpoint(**kwargs)

        return handler
