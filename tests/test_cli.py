"""The `adaptd` client commands, run as a user runs them (the installed console script, in a subprocess)
against the embedded service: submit --watch with live progress and download, jobs, status, download,
cancel, methods, connection settings, and the exit codes scripts rely on."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest

from app.client import Client, read_config, resolve_connection
from tests.helpers import add_jobs
from tests.services import REPO, free_port
from tests.ux_helpers import ADAPTD, adaptd, cli_env, finished_job, long_dataset

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
                            "-o", out, "--url", url, "--batch-size", "4", "--compile", "off"))
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
    assert job["spec"]["options"]["compile"] == "off"
    assert job["metrics"]["compile"] == {"option": "off", "compiled": False, "reason": "off in the job's options",
                                         "fallback": None, "first_step_seconds": None}
    sha = {a["name"]: a["sha256"] for a in job["artifacts"]}
    assert hashlib.sha256(out.read_bytes()).hexdigest() == sha["model.safetensors"]
    m = job["metrics"]
    assert f"{m['accuracy_before']:.1%} -> {m['accuracy_after']:.1%}" in err

    # jobs: the table lists it (by the 8 characters any command accepts back); --json is the API's page
    r = adaptd("jobs", "--url", url)
    assert r.returncode == 0 and job_id[:8] in r.stdout and "succeeded" in r.stdout, r.stderr
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


def test_failed_job_exits_1_with_code_and_message(embedded_service, assets, tmp_path):
    # The checkpoint is a 10-class digit CNN: asking for 7 classes is refused at submit, with the fix.
    args = submit_args(assets, "--data", assets["target"], "--watch", "--url", embedded_service.url)
    args[args.index("--num-classes") + 1] = "7"
    r = adaptd(*args)
    assert r.returncode == 4 and "num_classes_mismatch" in r.stderr and "num_classes to 10" in r.stderr, r.stderr
    # NaN weights pass the submit checks (they read no values) and fail the job (input's fault).
    import torch
    from safetensors.torch import load_file, save_file
    state = load_file(str(assets["model"]))
    state["classifier.weight"][0, 0] = torch.nan
    save_file(state, str(tmp_path / "nan.safetensors"))
    args[args.index("--num-classes") + 1] = "10"
    args[args.index("--model") + 1] = tmp_path / "nan.safetensors"
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


# --- output a person wants, runs found again -------------------------------------------------------------

def test_version_and_shell_completion():
    from importlib.metadata import version

    r = adaptd("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"adaptd {version('adaptd')}", r.stderr
    r = adaptd("completion", "bash")
    assert r.returncode == 0 and "_ADAPTD_COMPLETE=bash_complete" in r.stdout
    # What bash asks for on `adaptd lo<TAB>` and `adaptd submit --na<TAB>`.
    for words, cword, expected in (("adaptd lo", "1", "logs"), ("adaptd submit --na", "2", "--name")):
        r = adaptd(env=cli_env(_ADAPTD_COMPLETE="bash_complete", COMP_WORDS=words, COMP_CWORD=cword))
        assert r.returncode == 0 and f"plain,{expected}" in r.stdout.split(), r.stdout + r.stderr
    assert adaptd("completion", "tcsh").returncode == 2


def test_methods_without_a_server_and_without_torch():
    r = adaptd("methods", "tent")  # cli_env: no URL anywhere, no config file
    assert r.returncode == 0, r.stderr
    assert "tent  (tta" in r.stdout and "--param lr=…  float, default 0.001" in r.stdout
    code = ("import sys; from app.cli import main; rc = main(['methods', '--json']); "
            "sys.stdout.flush(); assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=REPO,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert {m["name"] for m in json.loads(r.stdout)} >= {"tent", "shot", "source"}


def test_job_id_prefixes(embedded_service, assets, tmp_path):
    url = embedded_service.url
    job = finished_job(url, assets)
    short = job["id"][:8]
    r = adaptd("jobs", "--url", url)
    assert r.returncode == 0 and short in r.stdout and job["id"] not in r.stdout  # the table shows 8
    r = adaptd("status", short, "--url", url)
    assert r.returncode == 0 and f"id          {job['id']}" in r.stdout, r.stderr
    r = adaptd("download", short, "metrics.json", "-o", tmp_path, "--url", url)
    assert r.returncode == 0 and json.loads((tmp_path / "metrics.json").read_text()) == job["metrics"]
    stem = uuid.uuid4().hex[:6]
    twins = [f"{stem}{i}0-0000-4000-8000-000000000000" for i in range(2)]
    add_jobs(embedded_service, {"default": twins})
    r = adaptd("status", stem, "--url", url)
    assert r.returncode == 4 and "ambiguous_job_id" in r.stderr and all(t in r.stderr for t in twins), r.stderr
    r = adaptd("cancel", stem[:4], "--url", url)
    assert r.returncode == 4 and "job_id_too_short" in r.stderr


def test_names_and_tags_from_the_cli(embedded_service, assets):
    url = embedded_service.url
    name = f"run-{uuid.uuid4().hex[:8]}"
    r = adaptd(*submit_args(assets, "--data", assets["target"], "--name", name, "--tag", "cli", "--tag", name,
                            "--url", url))
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    assert adaptd("cancel", job_id, "--url", url).returncode == 0  # queued: cancelled at once
    r = adaptd("jobs", "--name", name, "--url", url)
    rows = r.stdout.splitlines()
    assert r.returncode == 0 and len(rows) == 2 and rows[1].startswith(job_id[:8]) and name in rows[1], r.stdout
    assert f"cli,{name}" in rows[1]
    page = json.loads(adaptd("jobs", "--tag", name, "--tag", "cli", "--json", "--url", url).stdout)
    assert [j["id"] for j in page["items"]] == [job_id] and page["items"][0]["tags"] == ["cli", name]
    assert json.loads(adaptd("jobs", "--tag", name, "--tag", "other", "--json", "--url", url).stdout)["items"] == []
    r = adaptd("status", job_id, "--url", url)
    assert f"name        {name}" in r.stdout and f"tags        cli, {name}" in r.stdout


STATES = ("queued", "running", "succeeded", "failed", "cancelled")


def test_piped_watch_prints_each_state_once_and_logs_follow(embedded_service, assets):
    """Not a terminal: one line per (status, phase), counts from the first phase on (never 0/0); and
    `adaptd logs JOB --follow`, started while the job is queued or running, ends with its last line."""
    url = embedded_service.url
    watcher = subprocess.Popen([str(ADAPTD), *map(str, submit_args(assets, "--data", assets["target"], "--watch",
                                                                 "--no-download", "--url", url))],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        seen = []
        for text in watcher.stderr:  # uploads, then "submitted tent job ID (queued)"
            seen.append(text)
            if text.startswith("submitted"):
                break
        job_id = seen[-1].split("submitted tent job ")[1].split()[0]
        logs = adaptd("logs", job_id[:8], "--follow", "--url", url, timeout=600)
        out, err = watcher.communicate(timeout=600)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 0, err
    lines = err.splitlines()
    progress = [t for t in lines if t.split(" ", 1)[0] in STATES]
    states = [tuple(t.split()[:2]) if not t.startswith("queued") else ("queued",) for t in progress]
    assert len(states) == len(set(states)), err  # each state once
    assert len(lines) == len(set(lines)), err
    assert states[-1] == ("succeeded", "done"), err  # which phases it sees depends on the job's speed
    assert "0/0" not in err
    n_batches = -(-len(assets["x"]) // 16)
    # Counts from the first phase that knows them on (the watcher may see any subset of the phases).
    assert all(f"/{n_batches} batches" in t for t in progress if t.split()[0] != "queued"
               and t.split()[1] != "starting"), err

    assert logs.returncode == 0, logs.stderr
    messages = [t.split(None, 2)[2] for t in logs.stdout.splitlines()]
    assert messages[0].startswith("claimed by "), messages
    for phase in ("loading", "evaluating_source", "adapting", "evaluating", "exporting"):
        assert f"{phase} (0/{n_batches} batches)" in messages or f"{phase} ({n_batches}/{n_batches} batches)" \
            in messages, (phase, messages)
    assert messages[-1].startswith("succeeded, ") and len(messages) == len(set(messages)), messages


BANNERS = ("SecurityWarning", "superuser", "No hostname was supplied", "Warm shutdown", "[tasks]",
           "-------------- celery@", "Traceback", "Exception ignored")


def test_up_output_has_nothing_a_user_cannot_act_on(tmp_path):
    """`adaptd up`, started and stopped with Ctrl+C (SIGINT to the terminal's process group)."""
    port = free_port()
    proc = subprocess.Popen([str(ADAPTD), "up", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=cli_env(ADAPTD_HOME=str(tmp_path)))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any(t.rstrip().endswith(" ready.") for t in list(lines)):  # the worker is up
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            time.sleep(0.3)
        # Ready once the worker has also imported the engine (its probe, a few seconds after "ready.").
        while httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        reader.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert f"adaptd: API on http://127.0.0.1:{port}" in out
    assert not [b for b in BANNERS if b in out], out
