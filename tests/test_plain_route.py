"""PlainRoute (app/api/deps.py): the hot `GET /v1/jobs/{id}` is called without FastAPI's per-request
dependency resolution, yet documented from its signature like any route; an endpoint whose parameters
it cannot supply is refused when the route is built, not at request time."""
from __future__ import annotations

import pytest
from fastapi import APIRouter, Response

from app.api.deps import PlainRoute, PrincipalDep, SettingsDep


def test_get_job_is_a_plain_route_and_still_documented():
    from app.api import jobs
    from app.main import create_app

    app = create_app()
    plain = [r for r in jobs.hot.routes if r.path == "/v1/jobs/{job_id}" and "GET" in r.methods]
    others = [r for r in jobs.router.routes if r.path == "/v1/jobs/{job_id}" and "GET" in r.methods]
    assert len(plain) == 1 and isinstance(plain[0], PlainRoute) and not others
    op = app.openapi()["paths"]["/v1/jobs/{job_id}"]["get"]
    assert [(p["name"], p["in"], p["required"]) for p in op["parameters"]] == [("job_id", "path", True)]
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/JobOut")


@pytest.mark.parametrize("signature", ["query", "settings", "untyped"])
def test_unsupported_parameters_are_refused_when_built(signature):
    router = APIRouter(route_class=PlainRoute)

    async def query(job_id: str, limit: int = 3) -> Response: ...

    async def settings(job_id: str, settings: SettingsDep) -> Response: ...

    async def untyped(job_id, who: PrincipalDep) -> Response: ...

    endpoint = {"query": query, "settings": settings, "untyped": untyped}[signature]
    with pytest.raises(TypeError, match="PlainRoute"):
        router.add_api_route("/x/{job_id}", endpoint, methods=["GET"])
