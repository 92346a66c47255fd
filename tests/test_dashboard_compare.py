"""The dashboard's run comparison and what a finished job shows beyond its curves, in headless Chromium:
the list marks failed jobs with their error code and selects jobs to compare; the compare view puts
two jobs side by side (metrics with ECE, entropy and loss curves in distinct colours, per-class accuracy);
a job's page shows ECE, example images with their predictions before and after, integer step ticks, the
uniform line of the class histogram and its params one per line. Screenshots are saved for a person to
look at (the paths are printed)."""
from __future__ import annotations

import re

import pytest

from app.client import Client
from tests.ux_helpers import Chromium, finished_job, png_stats, spec_kwargs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def jobs(embedded_service, assets) -> dict:
    """A tent job (the shared one), a short bn_adapt job on the same data (3 steps), and a failed job."""
    url = embedded_service.url
    tent = finished_job(url, assets)
    with Client(url) as c:
        kwargs = spec_kwargs(assets, batch_size=256)
        kwargs.update(method="bn_adapt", params={})
        bn = c.wait(c.submit(**kwargs)["id"], poll=0.2, timeout=300)
        failing = spec_kwargs(assets)
        failing.update(eval_data=assets["target"])  # no labels: eval_data_unlabelled, in the worker
        failed = c.wait(c.submit(**failing)["id"], poll=0.2, timeout=300)
    assert bn["status"] == "succeeded" and bn["progress"]["total"] == 3, bn
    assert failed["status"] == "failed" and failed["error"]["code"] == "eval_data_unlabelled", failed
    return {"tent": tent, "bn": bn, "failed": failed}


def test_compare_two_jobs(embedded_service, jobs, chromium, tmp_path):
    url = embedded_service.url
    tent, bn, failed = jobs["tent"], jobs["bn"], jobs["failed"]
    browser = Chromium(chromium, height=1400)
    try:
        browser.open(f"{url}/#/")
        row = f'tr[data-job-id="{failed["id"]}"]'
        browser.wait_for(f"!!document.querySelector('{row}')", 30)
        assert browser.eval(f"document.querySelector('{row} .err-code').textContent") == "eval_data_unlabelled"
        assert browser.eval("document.getElementById('compare').disabled") is True
        for job in (tent, bn):
            browser.eval(f"document.querySelector('input.pick[value=\"{job['id']}\"]').click()")
        assert browser.eval("document.getElementById('compare').disabled") is False
        list_shot = browser.screenshot(tmp_path / "list.png")
        browser.eval("document.getElementById('compare').click()")
        browser.wait_for("document.body.dataset.ready === '1' && !!document.getElementById('compare-table')", 30)
        assert browser.eval("location.hash") == f"#/compare/{tent['id']},{bn['id']}"

        # metrics side by side, one column per job, ECE from the eval data
        heads = browser.eval("[...document.querySelectorAll('#compare-table thead th[data-job-id]')]"
                             ".map(th => th.dataset.jobId)")
        assert heads == [tent["id"], bn["id"]]

        def row_text(name: str) -> list[str]:
            return browser.eval(f"[...document.querySelectorAll('#compare-table tr[data-row=\"{name}\"] td')]"
                                ".map(td => td.textContent.trim())")

        assert row_text("Method") == ["tent", "bn_adapt"]
        for name, key in (("ECE after", "after"), ("ECE before", "before")):
            assert row_text(name) == [f"{100 * j['metrics']['eval'][key]['ece']:.1f}%" for j in (tent, bn)]
        assert row_text("Accuracy after") == [f"{100 * j['metrics']['accuracy_after']:.1f}%" for j in (tent, bn)]
        assert "lr = 0.001" in row_text("Params")[0]

        # curves: one smoothed series per job, in distinct colours that the legend repeats
        strokes = browser.eval("[...document.querySelectorAll('#compare-entropy path.series')]"
                               ".map(p => p.getAttribute('stroke'))")
        assert len(strokes) == 2 and len(set(strokes)) == 2
        legend = browser.eval("[...document.querySelectorAll('#compare-entropy .legend span')]"
                              ".map(s => s.dataset.color)")
        assert legend == strokes
        points = browser.eval("[...document.querySelectorAll('#compare-entropy path.series')]"
                              ".map(p => +p.dataset.points)")
        assert points == [tent["progress"]["total"], bn["progress"]["total"]]
        # bn_adapt logs no loss: only tent's loss curve is drawn
        assert browser.eval("document.querySelectorAll('#compare-loss path.series').length") == 1
        bars = browser.eval("document.querySelectorAll('#compare-perclass rect.bar').length")
        assert bars == 2 * len(tent["metrics"]["eval"]["after"]["per_class_accuracy"])
        ticks = browser.eval("[...document.querySelectorAll('#compare-entropy text.xtick')].map(t => t.textContent)")
        assert ticks and all(re.fullmatch(r"\d+", t) for t in ticks), ticks
        shot = browser.screenshot(tmp_path / "compare.png")
    finally:
        browser.close()
    size, stddev, colours = png_stats(shot)
    assert stddev > 15 and colours > 100, (stddev, colours)
    print(f"\ncompare screenshot: {shot}\nlist screenshot: {list_shot}")


def test_job_page_shows_ece_examples_and_wrapped_params(embedded_service, jobs, chromium, tmp_path):
    url = embedded_service.url
    tent = jobs["tent"]
    browser = Chromium(chromium, height=2600)
    try:
        browser.open(f"{url}/#/jobs/{tent['id']}")
        browser.wait_for("!!document.body && document.body.dataset.ready === '1'", 30)
        m = tent["metrics"]["eval"]
        ece = browser.eval("document.querySelector('#ece .value').textContent")
        assert ece == f"{100 * m['before']['ece']:.1f}% → {100 * m['after']['ece']:.1f}%"
        # example images with the label and the predictions before and after
        figures = browser.eval("[...document.querySelectorAll('#examples figure.example')].map(f => "
                               "({i: +f.dataset.index, b: +f.dataset.before, a: +f.dataset.after, "
                               "w: f.querySelector('img').naturalWidth, text: f.textContent}))")
        assert 1 <= len(figures) <= 8 and all(f["w"] > 0 for f in figures)  # the thumbnails decode
        assert any(f["b"] != f["a"] for f in figures)  # changed predictions come first
        assert all("label" in f["text"] and "before" in f["text"] and "after" in f["text"] for f in figures)
        # the uniform line over the predicted-class histogram, integer step ticks, params one per line
        assert browser.eval("document.querySelectorAll('#hist-chart line.ref-line').length") == 1
        ticks = browser.eval("[...document.querySelectorAll('#entropy-chart text.xtick')].map(t => t.textContent)")
        assert ticks and all(re.fullmatch(r"\d+", t) for t in ticks), ticks
        params = browser.eval("[...document.querySelectorAll('.params')[0].children].map(d => d.textContent)")
        assert "lr = 0.001" in params and len(params) == len(tent["params"])
        # a value far longer than the page is wide (a user factory's path, a long list) wraps in its cell
        browser.eval("document.querySelector('.params').insertAdjacentHTML('beforeend', "
                     "'<div>' + 'x'.repeat(20) + ' = ' + 'module.path:factory_'.repeat(40) + '</div>')")
        overflow = browser.eval("document.documentElement.scrollWidth > document.documentElement.clientWidth")
        assert overflow is False
        shot = browser.screenshot(tmp_path / "job.png")

        # a 3-step job: the step axis reads 0, 1, 2 (no 0.5 steps)
        browser.eval(f"location.hash = '#/jobs/{jobs['bn']['id']}'")
        browser.wait_for(f"document.body.dataset.ready === '1' && location.hash.includes('{jobs['bn']['id']}')", 30)
        browser.wait_for("!!document.querySelector('#entropy-chart text.xtick')", 30)
        ticks = browser.eval("[...document.querySelectorAll('#entropy-chart text.xtick')].map(t => t.textContent)")
        assert ticks == ["0", "1", "2"], ticks
    finally:
        browser.close()
    print(f"\njob page screenshot: {shot}")
