"""Row 2: no credential in a URL. `?api_key=` is not read; the dashboard signs in with a form that
trades the key for a short-lived HttpOnly, SameSite=Strict cookie; its live view (SSE) works with that;
after a whole dashboard session in headless Chromium the API's access log holds no key."""
from __future__ import annotations

import os
import time

import httpx
import pytest

from tests.security.conftest import ADMIN, admin, spec, upload
from tests.ux_helpers import Chromium, chromium_binary, long_dataset


@pytest.fixture(scope="module")
def chromium() -> str:
    binary = chromium_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed")
        pytest.skip("chromium is not installed (.ci/setup installs Debian's package where it can)")
    return binary


def _key(service, tenant: str) -> str:
    with admin(service) as a:
        r = a.post("/v1/admin/keys", json={"tenant": tenant})
    assert r.status_code == 201
    return r.json()["key"]


def test_query_parameter_keys_are_not_accepted(sec_postgres):
    r = httpx.get(f"{sec_postgres.url}/v1/admin/keys", params={"api_key": ADMIN})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    key = _key(sec_postgres, "urlkey")
    assert httpx.get(f"{sec_postgres.url}/v1/jobs", params={"api_key": key}).status_code == 401


def test_session_cookie_is_httponly_strict_short_and_signed(sec_postgres):
    key = _key(sec_postgres, "cookie")
    r = httpx.post(f"{sec_postgres.url}/v1/session", json={"api_key": key})
    assert r.status_code == 204, r.text
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert "Max-Age=3600" in cookie and key not in cookie
    value = r.cookies["adaptd_session"]
    ok = httpx.get(f"{sec_postgres.url}/v1/jobs", cookies={"adaptd_session": value})
    assert ok.status_code == 200
    expires, key_hash, mac = value.split(".")
    for forged in (f"{int(time.time()) + 10**6}.{key_hash}.{mac}",  # longer life, same signature
                   f"{expires}.{'0' * 64}.{mac}", "garbage"):
        r = httpx.get(f"{sec_postgres.url}/v1/jobs", cookies={"adaptd_session": forged})
        assert r.status_code == 401, forged
    assert httpx.post(f"{sec_postgres.url}/v1/session", json={"api_key": "adk_wrong"}).status_code == 401


def test_dashboard_session_leaves_no_key_in_the_access_log(sec_postgres, assets, chromium, tmp_path):
    key = _key(sec_postgres, "dash")
    log_path = sec_postgres.log_dir / "api.log"
    start = log_path.stat().st_size  # this session's lines only (the test above put keys in URLs on purpose)
    with httpx.Client(base_url=sec_postgres.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        model = upload(c, assets["model"].read_bytes(), "model", "m.safetensors")
        data = upload(c, long_dataset(tmp_path / "long.npz").read_bytes())
        r = c.post("/v1/jobs", json=spec(model["id"], data["id"], assets, options={"batch_size": 4}))
        assert r.status_code == 202, r.text
        job = r.json()
        browser = Chromium(chromium, height=1000)
        try:
            browser.open(f"{sec_postgres.url}/")
            browser.wait_for("!!document.getElementById('signin')", 30)  # 401 -> the sign-in form
            browser.eval(f"document.getElementById('api-key').value = {key!r};"
                         " document.getElementById('signin').requestSubmit(); true")
            browser.wait_for(f"!!document.querySelector('tr[data-job-id=\"{job['id']}\"]')", 60)
            assert "adaptd_session" not in browser.eval("document.cookie")  # HttpOnly: not visible to scripts
            assert key not in (browser.eval("JSON.stringify(localStorage)") or "")
            # the live view: the event stream (EventSource, cookie only) drives the progress line
            browser.eval(f"location.hash = '#/jobs/{job['id']}'")
            text = browser.wait_for("(() => { const p = document.getElementById('progress-text');"
                                    " return p && p.textContent.includes('img/s') && p.textContent; })()", 120)
            assert "batches" in text
            assert key not in browser.eval("location.href")
        finally:
            browser.close()
            c.post(f"/v1/jobs/{job['id']}/cancel")
    with open(log_path, "rb") as f:
        f.seek(start)
        log = f.read().decode(errors="replace")
    assert f"/v1/jobs/{job['id']}/events" in log  # the access log is on, and saw the live view
    assert key not in log and ADMIN not in log and "api_key" not in log
