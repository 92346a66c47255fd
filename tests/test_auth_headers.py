"""app.auth.presented_credentials reads the key and the session cookie in one pass over the raw headers;
it must agree with Starlette's own header and cookie mappings."""
from __future__ import annotations

import pytest
from starlette.requests import Request

from app.auth import SESSION_COOKIE, presented_credentials


def request(*headers: tuple[str, str]) -> Request:
    return Request({"type": "http", "method": "GET", "path": "/", "query_string": b"",
                    "headers": [(k.encode(), v.encode("latin-1")) for k, v in headers]})


@pytest.mark.parametrize("headers, expected", [
    ((), (None, None)),
    ((("authorization", "Bearer adk_a"),), ("adk_a", None)),
    ((("authorization", "bearer   adk_a  "), ("x-api-key", "adk_b")), ("adk_a", None)),
    ((("authorization", "Basic eDp5"), ("x-api-key", "adk_b")), ("adk_b", None)),
    ((("authorization", "Bearer "),), (None, None)),
    ((("authorization", "Bearer adk_first"), ("authorization", "Bearer adk_second")), ("adk_first", None)),
    ((("cookie", f"a=1; {SESSION_COOKIE}=tok.en"),), (None, "tok.en")),
    ((("cookie", "a=1"), ("cookie", f"{SESSION_COOKIE}=second")), (None, "second")),
    ((("x-api-key", "adk_c"), ("cookie", f"{SESSION_COOKIE}=s")), ("adk_c", "s")),
])
def test_same_as_starlette(headers, expected):
    r = request(*headers)
    assert presented_credentials(r) == expected
    auth = r.headers.get("authorization", "")
    starlette_key = (auth[7:].strip() or None) if auth.lower().startswith("bearer ") else (
        r.headers.get("x-api-key") or None)
    assert expected == (starlette_key, r.cookies.get(SESSION_COOKIE))
