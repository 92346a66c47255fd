"""`/docs` (Swagger UI) and `/redoc` work with no internet access: their assets are served by the app.
Checked in headless Chromium with every host name but the loopback unresolvable: the pages render the
API's operations, and every request the pages make goes to the service itself."""
from __future__ import annotations

import httpx
import pytest

from tests.ux_helpers import Chromium

pytestmark = pytest.mark.slow
OFFLINE = ("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",)


def _operations(url: str) -> list[str]:
    spec = httpx.get(f"{url}/openapi.json").json()
    return [op["operationId"] for path in spec["paths"].values() for op in path.values()]


# (page, JS counting the rendered operations, JS reading one operation's text)
PAGES = {
    "/docs": ("document.querySelectorAll('.opblock').length",
              "Array.from(document.querySelectorAll('.opblock-summary-path')).map(e => e.textContent).join(' ')"),
    "/redoc": ("document.querySelectorAll('[data-section-id^=\"operation/\"]').length",
               "document.body.innerText"),
}


@pytest.mark.parametrize("page", sorted(PAGES))
def test_api_docs_render_offline(embedded_service, chromium, tmp_path, page):
    url = embedded_service.url
    count_js, text_js = PAGES[page]
    n_ops = len(_operations(url))
    browser = Chromium(chromium, height=1000, flags=OFFLINE)
    try:
        browser.open(f"{url}{page}", record_network=True)
        rendered = browser.wait_for(f"(() => {{ const n = {count_js}; return n >= {n_ops} && n; }})()", 60)
        assert rendered >= n_ops
        assert "/v1/jobs" in browser.eval(text_js)
        shot = browser.screenshot(tmp_path / f"{page.strip('/')}.png")
        requested = browser.requested_urls()
    finally:
        browser.close()
    assert any(u.endswith(".js") for u in requested), requested
    outside = [u for u in requested if not u.startswith(url) and not u.startswith(("data:", "blob:"))]
    assert outside == [], outside
    print(f"\n{page} screenshot: {shot}")


def test_dashboard_api_link_points_at_the_offline_docs(embedded_service):
    url = embedded_service.url
    assert 'href="/docs"' in httpx.get(f"{url}/").text
    page = httpx.get(f"{url}/docs").text
    assert "/docs/assets/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        r = httpx.get(f"{url}/docs/assets/{name}")
        assert r.status_code == 200 and len(r.content) > 10_000, name
    assert httpx.get(f"{url}/docs/assets/core.py").json()["error"]["code"] == "not_found"
