"""A small typed Python client for the REST contract (README.md, "Using the API"). The CLI and the demo use it.

    from app.client import Client
    with Client("http://127.0.0.1:8000") as c:
        job = c.submit(method="tent", model="model.safetensors", architecture="resnet18", num_classes=10,
                       data="target.npz")                     # paths are uploaded, ids are used as they are
        for ev in c.events(job["id"]):                       # live: status, progress, step, end (SSE)
            if ev.event == "step":
                print(ev.data["step"], ev.data.get("loss"), ev.data["entropy"])
        job = c.wait(job["id"])
        c.download(job["id"], "model.safetensors", "adapted.safetensors")

Several source models (DistillNearest / DistillWeighted) train one student that the job exports:

        job = c.submit(method="distill_weighted", models=["mnist.safetensors", "usps.safetensors"],
                       architecture="digit_cnn", num_classes=10,      # shared by the sources that name none
                       student={"architecture": "digit_cnn", "num_classes": 10},
                       data="target.npz", labelled_data="few_labels.npz")

Connection settings: `Client.from_config()` reads `url`/`api_key` arguments, then ADAPTD_URL /
ADAPTD_API_KEY, then the config file (ADAPTD_CONFIG or ~/.config/adaptd/config.toml).
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, TypedDict, Union

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")
DEFAULT_URL = "http://127.0.0.1:8000"

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


# --- the shapes the API returns (dicts at run time; TypedDicts for editors and type checkers) ---------

class UploadInfo(TypedDict):
    id: str
    kind: Literal["model", "dataset", "prior"]
    filename: str | None
    size: int
    sha256: str
    created_at: str


class Progress(TypedDict):
    done: int
    total: int
    fraction: float
    phase: str | None


class JobErrorInfo(TypedDict):
    code: str
    message: str
    detail: dict


class ArtifactInfo(TypedDict):
    name: str
    size: int
    sha256: str


class Job(TypedDict):
    id: str
    name: str | None
    tags: list[str]
    status: JobStatus
    method: str
    params: dict
    spec: dict
    created_at: str
    started_at: str | None
    finished_at: str | None
    heartbeat_at: str | None
    attempts: int
    cancel_requested: bool
    progress: Progress
    metrics: dict | None
    error: JobErrorInfo | None
    artifacts: list[ArtifactInfo]


class LogLine(TypedDict):
    seq: int
    at: str
    level: str
    message: str


class JobList(TypedDict):
    items: list[Job]
    next_cursor: str | None


class MethodInfo(TypedDict):
    name: str
    kind: str
    description: str
    needs_labels: bool
    needs_source_statistics: bool
    needs_source_data: bool  # trains on a labelled source pool: the job's `source_data`
    updates_weights: bool
    tasks: list[str]
    task_defaults: dict  # {task: {param: value}}: the params' defaults that differ by task
    cost: dict  # default schedule: epochs, forward_passes and backward_passes over the target data
    params_schema: dict


@dataclass
class Event:
    """One Server-Sent Event of `GET /v1/jobs/{id}/events`: `event` is status, progress, step or end;
    `data` the decoded JSON."""

    event: str
    data: Any
    id: str | None = None


class ApiError(Exception):
    """The server answered with an error body `{"error": {code, message, detail}}`."""

    def __init__(self, status: int, code: str, message: str, detail: dict | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.detail = status, code, message, detail or {}


# A model or data reference for submit(): a local path (uploaded), an upload id, or an upload's dict.
Ref = Union[str, Path, Mapping[str, Any]]
ProgressFn = Callable[[int, int], None]


# --- connection settings -----------------------------------------------------------------------------

def config_path() -> Path:
    if os.environ.get("ADAPTD_CONFIG"):
        return Path(os.environ["ADAPTD_CONFIG"]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "adaptd" / "config.toml"


def read_config(path: Path | None = None) -> dict:
    """The client config file (TOML: `url = "..."`, `api_key = "..."`); {} when there is none."""
    path = path or config_path()
    if not path.is_file():
        return {}
    text = path.read_text()
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            return {m.group(1): m.group(2) for m in re.finditer(r'^\s*(\w+)\s*=\s*"([^"]*)"', text, re.M)}
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: invalid TOML: {exc}") from None


def resolve_connection(url: str | None = None, api_key: str | None = None) -> tuple[str, str | None]:
    """Explicit values first, then ADAPTD_URL / ADAPTD_API_KEY, then the config file, then the default."""
    cfg: dict | None = None

    def from_file(key: str):
        nonlocal cfg
        if cfg is None:
            cfg = read_config()
        return cfg.get(key)

    url = url or os.environ.get("ADAPTD_URL") or from_file("url") or DEFAULT_URL
    api_key = api_key or os.environ.get("ADAPTD_API_KEY") or from_file("api_key") or None
    return url, api_key


# --- the job spec from keyword arguments ---------------------------------------------------------------

def build_spec(base: Mapping | None = None, *, task: str | None = None, method: str | None = None,
               params: Mapping | None = None,
               model: Mapping | None = None, architecture: str | None = None, num_classes: int | None = None,
               arch_kwargs: Mapping | None = None, model_format: str | None = None,
               data: Mapping | None = None, data_format: str | None = None,
               eval_data: Mapping | None = None, eval_format: str | None = None,
               preprocess: Mapping | None = None, options: Mapping | None = None,
               notify_url: str | None = None, name: str | None = None, tags: list[str] | None = None,
               models: list[Mapping] | None = None, student: Mapping | None = None,
               labelled_data: Mapping | None = None, labelled_format: str | None = None) -> dict:
    """A job spec (`app/contract/jobs.py:JobSpec`): `base` (e.g. a spec file) overlaid with the given
    fields (`task`: classification, segmentation, detection). `model`, `data`, `eval_data`, `labelled_data`
    are refs `{"upload_id": ...}`; None leaves a field as `base` has it. `name` and `tags` label the run so that `jobs(name=..., tags=[...])` finds it again.

    Several source models (multi-source methods): `models` is a list of `{"upload_id", "architecture"?,
    "num_classes"?, "arch_kwargs"?, "format"?}`; `architecture`, `num_classes`, `arch_kwargs` and
    `model_format` then fill in what a source does not say (`arch_kwargs` only for sources of that
    `architecture`), and `student` is `{"architecture", "num_classes", "arch_kwargs"?,
    "upload_id"? (initial weights)}`."""
    spec = json.loads(json.dumps(base or {}))  # deep copy
    if task is not None:
        spec["task"] = task
    if method is not None:
        spec["method"] = method
    if params:
        spec["params"] = {**spec.get("params", {}), **params}
    if models is not None:
        spec["models"] = [dict(m) for m in models]
    if student is not None:
        spec["student"] = {**spec.get("student", {}), **student}
    if spec.get("models") is not None and not model:
        spec["models"] = [_fill_source(dict(m), architecture, num_classes, arch_kwargs, model_format)
                          for m in spec["models"]]
    elif model or architecture is not None or num_classes is not None or arch_kwargs or model_format is not None:
        m = spec.setdefault("model", {})
        m.update(model or {})
        if architecture is not None:
            m["architecture"] = architecture
        if num_classes is not None:
            m["num_classes"] = num_classes
        if arch_kwargs:
            m["arch_kwargs"] = {**m.get("arch_kwargs", {}), **arch_kwargs}
        if model_format is not None:
            m["format"] = model_format
    for key, ref, fmt in (("data", data, data_format), ("eval_data", eval_data, eval_format),
                          ("labelled_data", labelled_data, labelled_format)):
        if ref or fmt:
            d = spec.setdefault(key, {})
            d.update(ref or {})
            if fmt is not None:
                d["format"] = fmt
    if preprocess:
        spec["preprocess"] = {**spec.get("preprocess", {}), **preprocess}
    if options:
        spec["options"] = {**spec.get("options", {}), **options}
    if notify_url is not None:
        spec["notify_url"] = notify_url
    if name is not None:
        spec["name"] = name
    if tags is not None:
        spec["tags"] = list(tags)
    return spec


def _fill_source(source: dict, architecture: str | None, num_classes: int | None, arch_kwargs: Mapping | None,
                 model_format: str | None) -> dict:
    """One source of a multi-source spec with the shared fields filled in where it says nothing."""
    if source.get("architecture") is None and architecture is not None:
        source["architecture"] = architecture
    if arch_kwargs and source.get("architecture") == architecture:
        source["arch_kwargs"] = {**arch_kwargs, **source.get("arch_kwargs", {})}
    if source.get("num_classes") is None and num_classes is not None:
        source["num_classes"] = num_classes
    if source.get("format") is None and model_format is not None:
        source["format"] = model_format
    return source


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str | None, str | None, str | None, int | None]]:
    """Server-Sent Events framing: yields (event, data, id, retry_ms) per dispatched event
    (retry-only blocks yield event None)."""
    event = None
    data: list[str] = []
    event_id = retry = None
    for line in lines:
        line = line.rstrip("\r")
        if not line:
            if data or retry is not None:
                yield (event or "message") if data else None, "\n".join(data) if data else None, event_id, retry
            event, data, retry = None, [], None
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            event_id = value
        elif field == "retry" and value.isdigit():
            retry = int(value)


class Client:
    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 60.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url, self.timeout = url.rstrip("/"), timeout
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    @classmethod
    def from_config(cls, url: str | None = None, api_key: str | None = None, timeout: float = 60.0) -> "Client":
        url, api_key = resolve_connection(url, api_key)
        return cls(url, api_key, timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
            except Exception:  # noqa: BLE001
                err = {"code": f"http_{r.status_code}", "message": r.text[:500]}
            raise ApiError(r.status_code, err.get("code", ""), err.get("message", ""), err.get("detail"))
        return r

    # --- uploads ---------------------------------------------------------------------------------------

    def upload(self, path: str | Path, kind: str, filename: str | None = None,
               on_progress: ProgressFn | None = None, chunk: int = 1 << 20) -> UploadInfo:
        """Streams the file (never read whole into memory). `on_progress(sent, total)`."""
        path = Path(path)
        total = path.stat().st_size

        def body() -> Iterator[bytes]:
            sent = 0
            with open(path, "rb") as f:
                while data := f.read(chunk):
                    sent += len(data)
                    if on_progress:
                        on_progress(sent, total)
                    yield data

        r = self.http.post("/v1/uploads", params={"kind": kind, "filename": filename or path.name},
                           content=body(), headers={"Content-Type": "application/octet-stream",
                                                    "Content-Length": str(total)})
        return self._check(r).json()

    def get_upload(self, upload_id: str) -> UploadInfo:
        return self._check(self.http.get(f"/v1/uploads/{upload_id}")).json()

    def upload_ref(self, ref: Ref, kind: str,
                   on_upload: Callable[[Path, str], ProgressFn | None] | None = None) -> dict:
        """`{"upload_id": ...}` for a spec: a local path is uploaded (streamed); an upload id or an upload's
        dict is used as it is."""
        if isinstance(ref, Mapping):
            return {"upload_id": ref.get("upload_id") or ref["id"]}
        path = Path(ref)
        if isinstance(ref, Path) or path.exists():
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
            return {"upload_id": self.upload(path, kind, on_progress=on_upload(path, kind) if on_upload else None)["id"]}
        if re.fullmatch(r"[0-9a-fA-F-]{8,64}", str(ref)):
            return {"upload_id": str(ref)}
        raise FileNotFoundError(f"no such file: {ref} (and not an upload id)")

    # --- jobs ------------------------------------------------------------------------------------------

    def submit(self, spec: Mapping | None = None, idempotency_key: str | None = None, *,
               task: str | None = None, method: str | None = None, params: Mapping | None = None,
               model: Ref | None = None,
               architecture: str | None = None, num_classes: int | None = None,
               arch_kwargs: Mapping | None = None, model_format: str | None = None, data: Ref | None = None,
               data_format: str | None = None, eval_data: Ref | None = None, eval_format: str | None = None,
               preprocess: Mapping | None = None, options: Mapping | None = None, notify_url: str | None = None,
               name: str | None = None, tags: list[str] | None = None,
               models: list[Ref | Mapping] | None = None, student: Mapping | None = None,
               labelled_data: Ref | None = None, labelled_format: str | None = None,
               on_upload: Callable[[Path, str], ProgressFn | None] | None = None) -> Job:
        """`submit(spec)` posts a complete spec; keyword fields build or override one. `model`, `data`,
        `eval_data`, `labelled_data`: local paths (streamed up first), upload ids or upload dicts.
        `on_upload(path, kind)` may return an `on_progress(sent, total)` callback per file.

        Several source models (`distill_nearest`, `distill_weighted`): `models` in place of `model`, each a
        path or upload id (taking the shared `architecture`, `num_classes`, `arch_kwargs`) or a dict
        `{"model": path or upload id, "architecture", "num_classes", "arch_kwargs"}`; `student`
        `{"architecture", "num_classes", "arch_kwargs"?, "weights"?: path or upload id}`; `labelled_data`
        a few labelled target images."""
        fields = dict(task=task, method=method, params=params, architecture=architecture, num_classes=num_classes,
                      arch_kwargs=arch_kwargs, model_format=model_format, data_format=data_format,
                      eval_format=eval_format, preprocess=preprocess, options=options, notify_url=notify_url,
                      name=name, tags=tags, labelled_format=labelled_format)
        refs: dict[str, Any] = {
            name: self.upload_ref(ref, "model" if name == "model" else "dataset", on_upload)
            for name, ref in (("model", model), ("data", data), ("eval_data", eval_data),
                              ("labelled_data", labelled_data)) if ref is not None}
        if models is not None:
            refs["models"] = [self._source_ref(m, on_upload) for m in models]
        if student is not None:
            student = dict(student)
            weights = student.pop("weights", None)
            if weights is not None:
                student.update(self.upload_ref(weights, "model", on_upload))
            refs["student"] = student
        if refs or any(v is not None for v in fields.values()):
            spec = build_spec(spec, **fields, **refs)
        if spec is None:
            raise ValueError("submit() needs a spec or the method, model and data (architecture and num_classes "
                             "too, unless the model is one adaptd exported)")
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._check(self.http.post("/v1/jobs", json=dict(spec), headers=headers)).json()

    def _source_ref(self, source: Ref | Mapping, on_upload) -> dict:
        """One entry of `models`: a path or upload id, or a dict whose `model` (or `upload_id`) is one."""
        if isinstance(source, Mapping) and "model" in source:
            rest = {k: v for k, v in source.items() if k != "model"}
            return {**rest, **self.upload_ref(source["model"], "model", on_upload)}
        if isinstance(source, Mapping):
            return {**{k: v for k, v in source.items() if k != "id"}, **self.upload_ref(source, "model", on_upload)}
        return self.upload_ref(source, "model", on_upload)

    def job(self, job_id: str) -> Job:
        """A job by its id or any unique prefix of it (at least 6 characters)."""
        return self._check(self.http.get(f"/v1/jobs/{job_id}")).json()

    def jobs(self, status: str | None = None, limit: int = 50, cursor: str | None = None,
             view: str | None = None, name: str | None = None, tags: list[str] | None = None) -> JobList:
        """A page of jobs, newest first: summary rows (no spec, params, artifacts; scalar metrics), or
        with view="full" whole jobs as job() returns them. `name` matches exactly, `tags` all of them."""
        params = {k: v for k, v in {"status": status, "limit": limit, "cursor": cursor, "view": view,
                                    "name": name, "tag": list(tags) if tags else None}.items() if v is not None}
        return self._check(self.http.get("/v1/jobs", params=params)).json()

    def logs(self, job_id: str, follow: bool = False, after: int = 0, poll: float = 1.0) -> Iterator[LogLine]:
        """The job's own log lines, oldest first. `follow`: keep polling until the job has ended (its
        last lines are stored with its final status, so nothing is missed)."""
        while True:
            page = self._check(self.http.get(f"/v1/jobs/{job_id}/logs", params={"after": after})).json()
            job_id, after = page["job_id"], page["next_after"]  # a prefix is resolved once
            yield from page["items"]
            if page["more"]:
                continue
            if not follow or page["status"] in TERMINAL:
                return
            time.sleep(poll)

    def cancel(self, job_id: str) -> Job:
        return self._check(self.http.post(f"/v1/jobs/{job_id}/cancel")).json()

    def methods(self) -> list[MethodInfo]:
        return self._check(self.http.get("/v1/methods")).json()["methods"]

    def wait(self, job_id: str, on_update: Callable[[Job], None] | None = None, poll: float = 0.5,
             timeout: float | None = None) -> Job:
        """Polls until the job is finished; `on_update(job)` after each poll."""
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            job = self.job(job_id)
            if on_update:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            if deadline and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll)

    def events(self, job_id: str, last_event_id: str | None = None, timeout: float | None = None,
               max_reconnects: int = 20) -> Iterator[Event]:
        """Live events of a job (Server-Sent Events): `status` (the job), `progress` ({done, total,
        fraction, phase, images_per_second, eta_s}), `step` ({step, epoch, loss, entropy, ...}) and a
        final `end` (the finished job), after which the iterator stops. Reconnects with Last-Event-ID
        when the server ends a connection early (it bounds their lifetime) or the network drops."""
        deadline = time.monotonic() + timeout if timeout else None
        retry_s, failures = 2.0, 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_event_id is not None:
                headers["Last-Event-ID"] = last_event_id
            try:
                with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                                      timeout=httpx.Timeout(self.timeout, read=90.0)) as r:
                    if r.status_code >= 400:
                        r.read()
                        self._check(r)
                    for event, data, event_id, retry in parse_sse(r.iter_lines()):
                        if retry is not None:
                            retry_s = retry / 1000
                        if event_id is not None:
                            last_event_id = event_id
                        if event is None:
                            continue
                        failures = 0
                        try:
                            payload = json.loads(data) if data else None
                        except ValueError:
                            payload = data
                        yield Event(event, payload, event_id)
                        if event == "end":
                            return
                        if deadline and time.monotonic() > deadline:
                            raise TimeoutError(f"job {job_id} not finished after {timeout} s")
            except (httpx.TransportError, httpx.StreamError):
                failures += 1
                if failures > max_reconnects:
                    raise
            except ApiError as exc:
                if exc.status < 500:  # 404 and the like: the answer, not a hiccup
                    raise
                failures += 1  # 503 (database restarting, ...): try again
                if failures > max_reconnects:
                    raise
            if deadline and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout} s")
            time.sleep(min(retry_s * max(1, failures), 30.0))

    # --- artifacts -------------------------------------------------------------------------------------

    def download(self, job_id: str, name: str = "model.safetensors", dest: str | Path | None = None,
                 on_progress: ProgressFn | None = None) -> Path:
        """Streams an artifact to `dest` (a file, or a folder to put `name` in; default: `name` in
        the current folder). `on_progress(received, total)`."""
        dest = Path(dest) if dest is not None else Path(name)
        if dest.is_dir():
            dest = dest / name
        with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}") as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            total = int(r.headers.get("content-length") or 0)
            tmp = dest.with_name(dest.name + ".part")
            received = 0
            with open(tmp, "wb") as f:
                for data in r.iter_bytes():
                    f.write(data)
                    received += len(data)
                    if on_progress:
                        on_progress(received, total)
            tmp.replace(dest)
        return dest

    def artifact_json(self, job_id: str, name: str) -> dict:
        return self._check(self.http.get(f"/v1/jobs/{job_id}/artifacts/{name}")).json()
