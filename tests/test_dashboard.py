"""The dashboard at `/`, in headless Chromium (Debian's `chromium`; installed by .ci/run): a finished
job's page shows accuracy before/after, the loss and entropy curves, the predicted-class histograms and
per-class accuracy (asserted on the DOM, screenshot checked not blank); a running job's page updates live
from the event stream, and the job list shows it."""
from __future__ import annotations

import re

import httpx
import pytest

from app.client import Client
from tests.ux_helpers import Chromium, chromium_run, finished_job, long_dataset, png_stats, spec_kwargs

pytestmark = pytest.mark.slow


def test_static_files_and_routes(embedded_service):
    url = embedded_service.url
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js">' in page.text
    assert httpx.get(f"{url}/jobs/anything").text == page.text  # deep links load the same page
    js = httpx.get(f"{url}/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"] and "EventSource" in js.text
    assert httpx.get(f"{url}/static/app.css").headers["content-type"].startswith("text/css")
    assert httpx.get(f"{url}/static/..%2Fcli.py").status_code == 404
    assert httpx.get(f"{url}/static/nope.js").json()["error"]["code"] == "not_found"


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def test_finished_job_page(embedded_service, assets, chromium, tmp_path):
    job = finished_job(embedded_service.url, assets)
    m, total = job["metrics"], job["progress"]["total"]
    page = f"{embedded_service.url}/#/jobs/{job['id']}"

    r = chromium_run(chromium, page, "--dump-dom", "--virtual-time-budget=10000")
    dom = r.stdout
    assert 'data-ready="1"' in dom, (r.stderr[-2000:], dom[-3000:])
    assert 'data-status="succeeded"' in dom
    # accuracy before and after, as the API reports them
    assert re.search(rf'id="acc-before".*?{re.escape(_pct(m["accuracy_before"]))}', dom, re.S)
    assert re.search(rf'id="acc-after".*?{re.escape(_pct(m["accuracy_after"]))}', dom, re.S)
    # loss and entropy curves from history.json: one point per step
    for chart in ("loss-chart", "entropy-chart"):
        block = dom.split(f'id="{chart}"', 1)[1].split("</svg>", 1)[0]
        assert f'data-points="{total}"' in block, chart
        assert len(re.findall(r'<path class="series"', block)) == 2, chart  # raw + smoothed
    # predicted-class histogram before/after and per-class accuracy: 10 classes x 2 series
    hist = dom.split('id="hist-chart"', 1)[1].split("</svg>", 1)[0]
    assert len(re.findall(r'<rect class="bar"', hist)) == 20
    after = [int(round(float(v) * len(assets["y"])))
             for v in re.findall(r'data-series="after" data-category="\d" data-value="([^"]+)"', hist)]
    assert after == m["target"]["after"]["predicted_class_histogram"]
    per_class = dom.split('id="perclass-chart"', 1)[1].split("</svg>", 1)[0]
    assert len(re.findall(r'<rect class="bar"', per_class)) >= 10
    # label-free metrics and downloads
    for text in ("Predicted-class entropy", "Agreement with source", "Estimated accuracy", "Images / s"):
        assert text in dom
    for a in job["artifacts"]:
        assert f'href="/v1/jobs/{job["id"]}/artifacts/{a["name"]}"' in dom

    shot = tmp_path / "finished-job.png"
    r = chromium_run(chromium, page, f"--screenshot={shot}", "--window-size=1280,1600",
                     "--virtual-time-budget=10000")
    assert shot.exists(), r.stderr[-2000:]
    size, stddev, colours = png_stats(shot)
    assert size == (1280, 1600)
    assert stddev > 15 and colours > 100, (stddev, colours)  # charts and text, not a blank page
    print(f"\ndashboard screenshot: {shot}")


def test_live_job_page_and_list(embedded_service, assets, chromium, tmp_path):
    url = embedded_service.url
    with Client(url) as c:
        kwargs = spec_kwargs(assets, batch_size=4)
        kwargs.update(data=long_dataset(tmp_path / "long.npz"), eval_data=None)
        job = c.submit(**kwargs)
        browser = Chromium(chromium, height=1000)
        try:
            browser.open(f"{url}/#/jobs/{job['id']}")
            # live: the progress line shows throughput and ETA, the curves grow from `step` events
            text = browser.wait_for("(() => { const p = document.getElementById('progress-text');"
                                    " return p && p.textContent.includes('img/s') && p.textContent; })()", 120)
            assert "batches" in text and "ETA" in text
            first = browser.wait_for("(() => { const c = document.getElementById('entropy-chart');"
                                     " return c && +c.dataset.points; })()", 30)
            browser.wait_for(f"+document.getElementById('entropy-chart').dataset.points > {first}", 30)
            assert browser.eval("document.querySelector('#job-status .badge').textContent") == "running"
            shot = browser.screenshot(tmp_path / "live-job.png")
            assert png_stats(shot)[1] > 10

            # the list shows the running job; after cancelling, its page replays the live curves
            browser.eval("location.hash = '#/'")
            browser.wait_for(f"!!document.querySelector('tr[data-job-id=\"{job['id']}\"][data-status=\"running\"]')")
            c.cancel(job["id"])
            assert c.wait(job["id"], timeout=60)["status"] == "cancelled"
            browser.wait_for(f"!!document.querySelector('tr[data-job-id=\"{job['id']}\"][data-status=\"cancelled\"]')")
            browser.eval(f"location.hash = '#/jobs/{job['id']}'")
            browser.wait_for("document.body.dataset.ready === '1'")
            assert browser.eval("document.querySelector('#job-status .badge').textContent") == "cancelled"
            assert browser.eval("+document.getElementById('entropy-chart').dataset.points") > 0
        finally:
            browser.close()
            if c.job(job["id"])["status"] not in ("succeeded", "failed", "cancelled"):
                c.cancel(job["id"])
