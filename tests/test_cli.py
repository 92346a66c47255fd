"""The `adaptd` client commands, run as a user runs them (the installed console script, in a subprocess)
against the embedded service: submit --watch with live progress and download, jobs, status, download,
cancel, methods, connection settings, and the exit codes scripts rely on."""
from __future__ import annotations

import hashlib
import json
import subprocess
import time

import pytest

from app.client import Client, read_config, resolve_connection
from tests.ux_helpers import ADAPTD, adaptd, cli_env, long_dataset

pytestmark = pytest.mark.slow


def submit_args(assets, *extra) -> list[str]:
    pre = assets["preprocess"]
    return ["submit", "--method", "tent", "--param", "lr=0.001", "--param", "collapse_guard=true",
            "--model", assets["model"], "--arch", "digit_cnn", "--num-classes", "10",
            "--arch-kwarg", f"width={assets['arch_kwargs']['width']}",
            "--size", str(pre["size"]), "--channels", str(pre["channels"]),
            "--mean", ",".join(map(str, pre["mean"])), "--std", ",".join(map(str, pre["std"])),
            "--batch-size", "16", "--seed", "0", *extra]


def test_submit_watch_downloads_and_reports(embedded_service, assets, tmp_path):
    url = embedded_service.url
    out = tmp_path / "adapted.safetensors"
    # Long enough (1000 batches) that the watcher sees the adapting phase, however fast the queue is.
    data = long_dataset(tmp_path / "long.npz")
    r = adaptd(*submit_args(assets, "--data", data, "--eval-data", assets["eval"], "--watch",
                            "-o", out, "--url", url, "--batch-size", "4"))
    assert r.returncode == 0, r.stderr + embedded_service.logs()
    err = r.stderr
    for text in ("upload model.safetensors", "upload long.npz", "100.0%", "adapting", "batches",
                 "succeeded", "accuracy", "adapted weights:"):
        assert text in err, (text, err)
    job_id = err.split("submitted tent job ")[1].split()[0]

    with Client(url) as c:
        job = c.job(job_id)
    assert job["status"] == "succeeded" and job["params"]["lr"] == 0.001
    assert job["spec"]["preprocess"]["mean"] == assets["preprocess"]["mean"]
    assert job["spec"]["model"]["arch_kwargs"] == assets["arch_kwargs"]
    sha = {a["name"]: a["sha256"] for a in job["artifacts"]}
    assert hashlib.sha256(out.read_bytes()).hexdigest() == sha["model.safetensors"]
    m = job["metrics"]
    assert f"{m['accuracy_before']:.1%} -> {m['accuracy_after']:.1%}" in err

    # jobs: the table lists it; --json is the API's page
    r = adaptd("jobs", "--url", url)
    assert r.returncode == 0 and job_id in r.stdout and "succeeded" in r.stdout, r.stderr
    assert job_id in [j["id"] for j in json.loads(adaptd("jobs", "--json", "--url", url).stdout)["items"]]

    # status: human view and JSON, exit 0 for a succeeded job
    r = adaptd("status", job_id, "--url", url)
    assert r.returncode == 0 and "succeeded" in r.stdout and "model.safetensors" in r.stdout, r.stderr
    r = adaptd("status", job_id, "--json", "--url", url)
    assert r.returncode == 0 and json.loads(r.stdout)["metrics"]["accuracy_after"] == m["accuracy_after"]

    # download: an artifact by name, into a folder
    r = adaptd("download", job_id, "history.json", "-o", tmp_path, "--url", url)
    assert r.returncode == 0, r.stderr
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history["steps"]) == job["progress"]["total"]
    r = adaptd("download", job_id, "nope.bin", "-o", tmp_path, "--url", url)
    assert r.returncode == 4 and "artifact_not_found" in r.stderr


def test_methods_lists_params_with_defaults(embedded_service):
    r = adaptd("methods", "--url", embedded_service.url)
    assert r.returncode == 0, r.stderr
    assert "tent  (tta" in r.stdout and "shot" in r.stdout
    assert "--param lr=…  float, default 0.001" in r.stdout
    assert "Gradient steps per batch." in r.stdout
    r = adaptd("methods", "tent", "--json", "--url", embedded_service.url)
    [tent] = json.loads(r.stdout)
    assert tent["params_schema"]["properties"]["lr"]["default"] == 0.001
    assert adaptd("methods", "no_such", "--url", embedded_service.url).returncode == 2


def test_failed_job_exits_1_with_code_and_message(embedded_service, assets):
    # The checkpoint is a 10-class digit CNN: asking for 7 classes fails the job (input's fault).
    args = submit_args(assets, "--data", assets["target"], "--watch", "--url", embedded_service.url)
    args[args.index("--num-classes") + 1] = "7"
    r = adaptd(*args)
    assert r.returncode == 1, r.stderr
    assert "failed" in r.stderr and "error " in r.stderr
    job_id = r.stderr.split("submitted tent job ")[1].split()[0]
    job = Client(embedded_service.url).job(job_id)
    assert f"error {job['error']['code']}: {job['error']['message']}" in r.stderr
    assert adaptd("status", job_id, "--url", embedded_service.url).returncode == 1


def test_cancel_while_watching_exits_3(embedded_service, assets, tmp_path):
    url = embedded_service.url
    big = long_dataset(tmp_path / "long.npz")
    args = submit_args(assets, "--data", big, "--watch", "--url", url)
    args[args.index("--batch-size") + 1] = "4"
    watcher = subprocess.Popen([str(ADAPTD), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=cli_env())
    try:
        with Client(url) as c:
            deadline = time.monotonic() + 120
            while True:
                items = [j for j in c.jobs(status="running", view="full")["items"]
                         if j["spec"]["options"]["batch_size"] == 4]
                if items and items[0]["progress"]["phase"] == "adapting":
                    break
                assert time.monotonic() < deadline and watcher.poll() is None, "the long job never ran"
                time.sleep(0.3)
        job_id = items[0]["id"]
        r = adaptd("cancel", job_id, "--url", url)
        assert r.returncode == 0 and "cancel requested" in r.stdout, r.stderr
        out, err = watcher.communicate(timeout=120)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 3, err
    assert "cancelled" in err and "adapting" in err
    assert adaptd("status", job_id, "--url", url).returncode == 3
    assert adaptd("cancel", job_id, "--url", url).returncode == 0  # idempotent


def test_usage_and_connection_errors(embedded_service, assets, tmp_path):
    url = embedded_service.url
    r = adaptd("submit", "--url", url)  # nothing to submit
    assert r.returncode == 2 and "--method" in r.stderr and "--model" in r.stderr
    r = adaptd("submit", "--method", "tent", "--param", "lr", "--url", url)
    assert r.returncode == 2 and "KEY=VALUE" in r.stderr
    r = adaptd("submit", "--batch-size", "many")  # argparse
    assert r.returncode == 2
    r = adaptd(*submit_args(assets, "--data", tmp_path / "missing.npz", "--url", url))
    assert r.returncode == 2 and "missing.npz" in r.stderr
    r = adaptd("status", "no-such-job", "--url", url)
    assert r.returncode == 4 and "job_not_found" in r.stderr
    r = adaptd("jobs", "--url", "http://127.0.0.1:9")  # nobody listens on the discard port
    assert r.returncode == 4 and "connection_failed" in r.stderr
    # A spec the API refuses (unknown method): the error code and the field, exit 4.
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"method": "no_such_method", "model": {"architecture": "digit_cnn",
                                                                       "num_classes": 10}}))
    r = adaptd("submit", "--spec", spec, "--model", assets["model"], "--data", assets["target"], "--url", url)
    assert r.returncode == 4 and "unknown_method" in r.stderr, r.stderr


def test_connection_settings_precedence(embedded_service, tmp_path, monkeypatch):
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'url = "{embedded_service.url}"\napi_key = "from-file"\n')
    for k in ("ADAPTD_URL", "ADAPTD_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("ADAPTD_CONFIG", str(cfg))
    assert read_config() == {"url": embedded_service.url, "api_key": "from-file"}
    assert resolve_connection() == (embedded_service.url, "from-file")
    monkeypatch.setenv("ADAPTD_URL", "http://env:1")
    monkeypatch.setenv("ADAPTD_API_KEY", "from-env")
    assert resolve_connection() == ("http://env:1", "from-env")
    assert resolve_connection("http://flag:2", "from-flag") == ("http://flag:2", "from-flag")
    monkeypatch.setenv("ADAPTD_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.delenv("ADAPTD_URL")
    assert resolve_connection()[0] == "http://127.0.0.1:8000"

    # The console script: the config file alone finds the server; the environment wins over it; the
    # flag wins over both. (The open-mode server refuses an unknown key, so this file names no key.)
    cfg.write_text(f'url = "{embedded_service.url}"\n')
    assert adaptd("jobs", env=cli_env(ADAPTD_CONFIG=str(cfg))).returncode == 0
    keyed = adaptd("jobs", env=cli_env(ADAPTD_CONFIG=str(cfg), ADAPTD_API_KEY="adk_unknown"))
    assert keyed.returncode == 4 and "invalid_api_key" in keyed.stderr  # the key is sent
    bad_env = cli_env(ADAPTD_CONFIG=str(cfg), ADAPTD_URL="http://127.0.0.1:9")
    assert adaptd("jobs", env=bad_env).returncode == 4
    assert adaptd("jobs", "--url", embedded_service.url, env=bad_env).returncode == 0
