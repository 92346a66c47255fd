"""The browser dashboard: static HTML + vanilla JS from app/static, no build step. It talks to the same
REST API and SSE stream as every other client."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from ..errors import ApiError

STATIC = Path(__file__).resolve().parent.parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8"}
router = APIRouter(include_in_schema=False)


def _file(name: str) -> FileResponse:
    path = STATIC / name
    if "/" in name or name.startswith(".") or path.suffix not in TYPES or not path.is_file():
        raise ApiError("not_found", f"no file {name!r}")
    return FileResponse(path, media_type=TYPES[path.suffix], headers={"Cache-Control": "no-cache"})


@router.get("/")
async def index() -> FileResponse:
    return _file("index.html")


@router.get("/jobs/{job_id}")
async def job_page(job_id: str) -> FileResponse:  # the page reads the id from location
    return _file("index.html")


@router.get("/static/{name}")
async def static(name: str) -> FileResponse:
    return _file(name)
