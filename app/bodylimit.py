"""Bounds on request bodies other than uploads (job specs, admin and session calls): at most
ADAPTD_MAX_REQUEST_BYTES (413 payload_too_large, checked on the declared length and on the bytes as
they arrive) and JSON nested at most ADAPTD_MAX_JSON_DEPTH deep (422: deeper input would make the
JSON parser recurse towards Python's limit). Uploads stream under their own limits."""
from __future__ import annotations

from fastapi.responses import JSONResponse

from .config import get_settings
from .errors import STATUS, error_body

UNBOUNDED_PREFIXES = ("/v1/uploads",)


def json_depth(body: bytes) -> int:
    """Deepest nesting of arrays/objects in a JSON text (strings skipped), without parsing it."""
    depth = deepest = 0
    in_string = escaped = False
    for b in body:
        if in_string:
            if escaped:
                escaped = False
            elif b == 0x5C:  # backslash
                escaped = True
            elif b == 0x22:  # quote
                in_string = False
        elif b == 0x22:
            in_string = True
        elif b in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif b in (0x5D, 0x7D):
            depth -= 1
    return deepest


class BodyLimit:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS")
                or scope["path"].startswith(UNBOUNDED_PREFIXES)):
            return await self.app(scope, receive, send)
        settings = get_settings()
        limit = settings.max_request_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await _refuse(scope, receive, send, "payload_too_large", limit)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await _refuse(scope, receive, send, "payload_too_large", limit)
        if b"json" in headers.get(b"content-type", b"") and json_depth(body) > settings.max_json_depth:
            return await _refuse(scope, receive, send, "validation_error", settings.max_json_depth)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _refuse(scope, receive, send, code: str, limit: int) -> None:
    if code == "payload_too_large":
        message, detail = f"request body exceeds {limit} bytes", {"limit_bytes": limit}
    else:
        message, detail = f"request: JSON nested deeper than {limit} levels", {"max_depth": limit}
    await JSONResponse(error_body(code, message, detail), status_code=STATUS[code],
                       headers={"Connection": "close"})(scope, receive, send)
