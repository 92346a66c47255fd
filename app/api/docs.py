"""`/docs` (Swagger UI) and `/redoc` with their JavaScript and CSS served by the app itself, so both work
with no internet access. The assets come from the `fastapi-offline` package (MIT; it vendors
swagger-ui-dist 5 (Apache-2.0), which renders OpenAPI 3.1, and redoc 2 (MIT)); only its files are used."""
from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

from ..errors import ApiError

ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
TYPES = {"swagger-ui-bundle.js": "text/javascript; charset=utf-8", "swagger-ui.css": "text/css; charset=utf-8",
         "redoc.standalone.js": "text/javascript; charset=utf-8", "favicon.png": "image/png"}
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
# The pages may fetch only from the service: redoc's sidebar logo (an <img> from its CDN) is blocked in
# the browser instead of leaking a request; swagger's inline start-up script and redoc's inline styles
# and blob: web worker are allowed.
CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; font-src 'self' data:")
router = APIRouter(include_in_schema=False)


def _page(response: HTMLResponse) -> HTMLResponse:
    response.headers["Content-Security-Policy"] = CSP
    return response


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    return _page(get_swagger_ui_html(openapi_url=request.app.openapi_url, title=f"{request.app.title} - Swagger UI",
                               oauth2_redirect_url=OAUTH2_REDIRECT_URL,
                               swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                               swagger_css_url="/docs/assets/swagger-ui.css",
                               swagger_favicon_url="/docs/assets/favicon.png"))


@router.get(OAUTH2_REDIRECT_URL)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    return _page(get_redoc_html(openapi_url=request.app.openapi_url, title=f"{request.app.title} - ReDoc",
                          redoc_js_url="/docs/assets/redoc.standalone.js",
                          redoc_favicon_url="/docs/assets/favicon.png", with_google_fonts=False))


@router.get("/docs/assets/{name}")
async def asset(name: str) -> FileResponse:
    if name not in TYPES:  # a fixed list: nothing else in the package's folder is reachable
        raise ApiError("not_found", f"no file {name!r}")
    return FileResponse(ASSETS / name, media_type=TYPES[name],
                        headers={"Cache-Control": "public, max-age=86400"})
