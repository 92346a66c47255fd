"""Several models per job as a user sees them, through the real service: `adaptd submit` with three
`--model` sources and `--student-arch` (what it prints: each source's similarity, weight and accuracy, the
selected one, the estimate with its typical error), `adaptd submit --method auto --candidates` (every
candidate's score beside its accuracy, the pick), the Python client's several-model submit, and the
dashboard's pages of those finished jobs in headless Chromium (sources and candidates side by side, the
pick highlighted, the estimate shown as an estimate)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from app.client import Client
from tests.engine.test_multisource import KW
from tests.test_multisource_http import STUDENT, c, up  # noqa: F401 - fixtures: the three trained sources
from tests.ux_helpers import Chromium, adaptd, png_stats

pytestmark = pytest.mark.slow

PRE_FLAGS = ["--size", "16", "--channels", "1", "--mean", "0.5", "--std", "0.5"]
KW_FLAGS = [f for k, v in KW.items() for f in ("--arch-kwarg", f"{k}={v}")]


@pytest.fixture(scope="module")
def cli_jobs(embedded_service, up, tmp_path_factory) -> dict:  # noqa: F811
    """A three-source distill_weighted job and an auto job, each submitted and watched by the CLI."""
    d, url = up["dir"], embedded_service.url
    out = tmp_path_factory.mktemp("multisource-cli")
    names = ["clean", "scanner", "inverted"]
    # the second source says its architecture and class count itself (FILE@ARCH,N); the others take --arch
    models = [str(d / "clean.safetensors"), f"{d / 'scanner.safetensors'}@digit_cnn,10", str(d / "inverted.safetensors")]
    student_kw = [f for k, v in STUDENT["arch_kwargs"].items() for f in ("--student-arch-kwarg", f"{k}={v}")]
    distill = adaptd("submit", "--method", "distill_weighted", *[f for m in models for f in ("--model", m)],
                     "--arch", "digit_cnn", "--num-classes", "10", *KW_FLAGS, "--student-arch", "digit_cnn",
                     *student_kw, "--data", d / "target.npz", "--labelled-data", d / "labelled.npz",
                     "--eval-data", d / "eval.npz", *PRE_FLAGS, "--batch-size", "64", "--epochs", "4",
                     "--seed", "0", "--watch", "-o", out / "student.safetensors", "--url", url)
    best = names[int(np.argmax(up["accuracy"]))]
    auto = adaptd("submit", "--method", "auto", "--candidates", "source,bn_adapt,tent",
                  "--model", d / f"{best}.safetensors", "--arch", "digit_cnn", "--num-classes", "10", *KW_FLAGS,
                  "--data", d / "target.npz", "--eval-data", d / "eval.npz", *PRE_FLAGS, "--batch-size", "64",
                  "--seed", "0", "--watch", "--no-download", "--url", url)
    jobs = {}
    with Client(url) as client:
        for key, r, method in (("distill", distill, "distill_weighted"), ("auto", auto, "auto")):
            assert r.returncode == 0, r.stderr + embedded_service.logs()
            jobs[key] = client.job(r.stderr.split(f"submitted {method} job ")[1].split()[0])
            jobs[key + "_out"] = r.stderr
    jobs["student"] = out / "student.safetensors"
    return jobs


def test_cli_three_sources(cli_jobs, up):  # noqa: F811
    job, err = cli_jobs["distill"], cli_jobs["distill_out"]
    assert job["status"] == "succeeded", job["error"]
    spec, m = job["spec"], job["metrics"]
    # the spec the CLI built: three uploaded sources with their architectures, the student, the labelled set
    assert [s["architecture"] for s in spec["models"]] == ["digit_cnn"] * 3
    assert [s["arch_kwargs"] for s in spec["models"]] == [KW] * 3
    assert spec["student"] == {**STUDENT, "upload_id": None, "format": None}
    assert spec["labelled_data"]["upload_id"] and cli_jobs["student"].stat().st_size > 0
    assert [s["accuracy"] for s in m["sources"]] == pytest.approx(up["accuracy"], abs=1e-6)
    # what it printed: every source with its similarity, weight and accuracy; the selected one marked
    sel = m["selected_source"]
    assert f"selected #{sel}" in err, err
    for s in m["sources"]:
        line = next(ln for ln in err.splitlines() if ln.strip().startswith(f"#{s['index']} digit_cnn/10"))
        assert f"similarity {s['similarity']:8.3f}" in line and f"weight {s['weight']:.3f}" in line, line
        assert f"accuracy {s['accuracy']:.1%}" in line, line
        assert line.endswith("<- selected") == (s["index"] == sel), line
    assert f"accuracy   {m['accuracy_before']:.1%} -> {m['accuracy_after']:.1%}" in err
    # the estimate as an estimate, with the estimator's typical error
    assert (f"estimated accuracy {m['estimated_accuracy_after']:.1%} ± {100 * m['estimated_accuracy_error']:.1f} pts"
            f"   label-free estimate, {m['estimator']}") in err, err
    for note in m["notes"]:
        assert f"note       {note}" in err


def test_cli_auto(cli_jobs, embedded_service):
    job, err = cli_jobs["auto"], cli_jobs["auto_out"]
    assert job["status"] == "succeeded", job["error"]
    m = job["metrics"]
    assert job["params"]["candidates"] == ["source", "bn_adapt", "tent"]
    assert f"candidates criterion {m['criterion']} (label-free, higher is better); picked {m['selected_method']}" in err
    for cand in m["candidates"]:
        line = next(ln for ln in err.splitlines() if ln.strip().startswith(cand["method"] + " "))
        assert f"score {cand['score']:.4f}" in line and f"accuracy {cand['accuracy_after']:.1%}" in line, line
        assert line.endswith("<- picked") == (cand["method"] == m["selected_method"]), line
    best = max(m["candidates"], key=lambda x: x["accuracy_after"])
    assert f"with labels the best is {best['method']} ({best['accuracy_after']:.1%})" in err
    # status renders the same for a finished job; --json is the API's job
    r = adaptd("status", job["id"][:8], "--url", embedded_service.url)
    assert r.returncode == 0 and f"picked {m['selected_method']}" in r.stdout, r.stderr


def test_cli_refuses_unclear_sources(up, embedded_service):  # noqa: F811
    d = up["dir"]
    r = adaptd("submit", "--method", "distill_weighted", "--model", d / "clean.safetensors", "--model",
               d / "scanner.safetensors", "--data", d / "target.npz", "--url", embedded_service.url)
    assert r.returncode == 2 and "--student-arch" in r.stderr, r.stderr
    r = adaptd("submit", "--method", "tent", "--candidates", "tent", "--model", d / "clean.safetensors",
               "--data", d / "target.npz", "--url", embedded_service.url)
    assert r.returncode == 2 and "--candidates is for --method auto" in r.stderr, r.stderr
    # the server names the source that says nothing of its architecture
    r = adaptd("submit", "--method", "distill_nearest", "--model", d / "clean.safetensors", "--model",
               d / "scanner.safetensors@digit_cnn,10", "--student-arch", "digit_cnn", "--num-classes", "10",
               "--data", d / "target.npz", "--url", embedded_service.url)
    assert r.returncode == 4 and "models[0].architecture" in r.stderr, r.stderr


def test_client_submits_several_models(c, up, cli_jobs):  # noqa: F811
    """Client.submit with `models` (paths and an upload id with its own fields) and a student started from
    the CLI job's exported student: its architecture comes from that checkpoint's adaptd metadata."""
    d = up["dir"]
    job = c.submit(method="distill_nearest", models=[d / "clean.safetensors",
                                                     {"model": up["sources"][1], "architecture": "digit_cnn"},
                                                     d / "inverted.safetensors"],
                   architecture="digit_cnn", num_classes=10, arch_kwargs=KW, student={"weights": cli_jobs["student"]},
                   data=d / "target.npz", labelled_data=d / "labelled.npz", eval_data=up["eval"],
                   preprocess={"size": 16, "channels": 1, "mean": [0.5], "std": [0.5]},
                   options={"batch_size": 64, "epochs": 1, "seed": 0})
    assert [s["upload_id"] for s in job["spec"]["models"]][1] == up["sources"][1]
    assert [s["arch_kwargs"] for s in job["spec"]["models"]] == [KW] * 3
    assert {k: job["spec"]["student"][k] for k in STUDENT} == STUDENT and job["spec"]["student"]["upload_id"]
    job = c.wait(job["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    m = job["metrics"]
    assert [s["weight"] for s in m["sources"]] == [1.0 if i == m["selected_source"] else 0.0 for i in range(3)]


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def test_dashboard_sources_and_candidates(embedded_service, cli_jobs, chromium, tmp_path):
    url = embedded_service.url
    distill, auto = cli_jobs["distill"], cli_jobs["auto"]
    browser = Chromium(chromium, height=2200)
    try:
        # several sources: one row each, in upload order, with similarity, weight, accuracy; the pick marked
        m = distill["metrics"]
        browser.open(f"{url}/#/jobs/{distill['id']}")
        browser.wait_for("!!document.body && document.body.dataset.ready === '1' && !!document.getElementById('sources-table')", 30)
        rows = browser.eval("[...document.querySelectorAll('#sources-table tbody tr')].map(tr => ({i: +tr.dataset.source, "
                            "pick: tr.classList.contains('pick'), sim: +tr.querySelector('[data-similarity]').dataset.similarity, "
                            "w: +tr.querySelector('[data-weight]').dataset.weight, text: tr.textContent}))")
        assert [r["i"] for r in rows] == [0, 1, 2]
        assert [r["pick"] for r in rows] == [i == m["selected_source"] for i in range(3)]
        for r, s in zip(rows, m["sources"]):
            assert r["sim"] == pytest.approx(s["similarity"]) and r["w"] == pytest.approx(s["weight"])
            assert _pct(s["weight"]) in r["text"] and _pct(s["accuracy"]) in r["text"], r
        assert "nearest" in rows[m["selected_source"]]["text"]
        bars = browser.eval("[...document.querySelectorAll('#sources-chart rect.bar')].map(b => [b.dataset.series, +b.dataset.value])")
        assert [v for s, v in bars if s == "weight"] == pytest.approx([s["weight"] for s in m["sources"]])
        assert [v for s, v in bars if s == "source accuracy"] == pytest.approx([s["accuracy"] for s in m["sources"]])
        section = browser.eval("document.getElementById('sources').textContent")
        assert "DistillWeighted distils every source" in section and "student" in section
        _estimate_shown(browser, m)
        shot = browser.screenshot(tmp_path / "sources.png")
        assert png_stats(shot)[2] > 100

        # auto: every candidate's score and accuracy, the pick highlighted and why
        m = auto["metrics"]
        browser.open(f"{url}/#/jobs/{auto['id']}")
        browser.wait_for("!!document.body && document.body.dataset.ready === '1' && !!document.getElementById('candidates-table')", 30)
        rows = browser.eval("[...document.querySelectorAll('#candidates-table tbody tr')].map(tr => ({m: tr.dataset.candidate, "
                            "pick: tr.classList.contains('pick'), score: +tr.querySelector('[data-score]').dataset.score, "
                            "text: tr.textContent}))")
        assert [r["m"] for r in rows] == ["source", "bn_adapt", "tent"]
        for r, cand in zip(rows, m["candidates"]):
            assert r["pick"] == (cand["method"] == m["selected_method"])
            assert r["score"] == pytest.approx(cand["score"]) and _pct(cand["accuracy_after"]) in r["text"]
        why = browser.eval("document.getElementById('auto-why').textContent")
        assert f"Picked {m['selected_method']}" in why and m["criterion"] in why and "no labels" in why
        best = max(x["accuracy_after"] for x in m["candidates"])
        chosen = next(x for x in m["candidates"] if x["method"] == m["selected_method"])
        assert ("also the most accurate" in why) == (chosen["accuracy_after"] >= best), why
        _estimate_shown(browser, m)
        print(f"\nscreenshots: {shot} {browser.screenshot(tmp_path / 'candidates.png')}")
    finally:
        browser.close()


def _estimate_shown(browser: Chromium, m: dict) -> None:
    """The estimate with its typical error (section and kpi card) and the metrics' notes, if any."""
    err = f"{100 * m['estimated_accuracy_error']:.1f}"
    value = browser.eval("document.getElementById('estimate-value').textContent")
    assert value == f"{_pct(m['estimated_accuracy_after'])} ± {err} points", value
    card = browser.eval("document.getElementById('est-acc').textContent")
    assert m["estimator"] in card and f"± {err} pts typical error" in card, card
    notes = browser.eval("[...document.querySelectorAll('#notes li')].map(li => li.textContent)")
    assert notes == m["notes"], (notes, m["notes"])
    assert not re.search(r"undefined|NaN", browser.eval("document.getElementById('app').textContent"))
