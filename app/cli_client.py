"""The client side of the `adaptd` command: submit, jobs, status, download, cancel, methods.

Everything goes through the REST API (app.client), so these commands work against any adaptd server.
Server URL and API key: `--url` / `--api-key`, then ADAPTD_URL / ADAPTD_API_KEY, then the config file
(ADAPTD_CONFIG or ~/.config/adaptd/config.toml: `url = "..."`, `api_key = "..."`).

Exit codes (for scripts): 0 succeeded (or the command did what it was asked), 1 the job failed,
2 usage error, 3 the job was cancelled, 4 connection or API error; `status` of a job still queued or
running exits 0.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, TextIO

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED, EXIT_API = 0, 1, 2, 3, 4
STATUS_EXIT = {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}


class UsageError(Exception):
    pass


# --- progress rendering (plain stderr; a live bar on a terminal, sparse lines otherwise) ----------------

def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def bar(fraction: float, width: int = 24) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    full = int(fraction * width)
    return "[" + "#" * full + "-" * (width - full) + "]"


class Line:
    """One status line on stderr: redrawn in place on a terminal; on a pipe or a log file, printed
    when its key (e.g. the phase) changes or at most every `every` seconds."""

    def __init__(self, stream: TextIO | None = None, quiet: bool = False, every: float = 2.0):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.quiet, self.every = quiet, every
        self.width = 0
        self.last_key: object = None
        self.last_print = 0.0

    def show(self, text: str, key: object = None, force: bool = False) -> None:
        if self.quiet:
            return
        if self.tty:
            now = time.monotonic()
            if not force and key == self.last_key and now - self.last_print < 0.1:
                return  # at most ~10 redraws a second
            self.last_key, self.last_print = key, now
            pad = max(0, self.width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
            self.width = len(text)
            return
        now = time.monotonic()
        if force or key != self.last_key or now - self.last_print >= self.every:
            self.stream.write(text + "\n")
            self.stream.flush()
            self.last_key, self.last_print = key, now

    def done(self, text: str | None = None) -> None:
        if self.quiet:
            return
        if text is not None:
            self.show(text, force=True)
        if self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()
        self.width = 0


def transfer_progress(label: str, line: Line) -> Callable[[int, int], None]:
    t0 = time.monotonic()

    def update(sent: int, total: int) -> None:
        dt = max(time.monotonic() - t0, 1e-6)
        frac = sent / total if total else 1.0
        speed = sent / dt
        eta = (total - sent) / speed if speed > 0 and total else None
        line.show(f"{label:28.28s} {bar(frac)} {frac:6.1%}  {human_bytes(sent)}/{human_bytes(total)}  "
                  f"{human_bytes(speed)}/s  ETA {human_duration(eta)}", key=(label, sent >= total))

    return update


# --- helpers -------------------------------------------------------------------------------------------

def parse_value(text: str):
    """JSON-typed when it parses (1e-3, true, [1,2], "x"), else the plain string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_pairs(pairs: list[str] | None, flag: str) -> dict:
    out = {}
    for item in pairs or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} takes KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_value(value)
    return out


def parse_floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        value = json.loads(text) if text.strip().startswith("[") else [float(v) for v in text.split(",")]
        return [float(v) for v in value]
    except (ValueError, TypeError):
        raise UsageError(f"{flag} takes comma-separated numbers (0.5,0.5,0.5), got {text!r}") from None


def _client(args):
    from .client import Client, resolve_connection

    try:
        url, api_key = resolve_connection(args.url, args.api_key)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return Client(url, api_key)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.1%}" if pct else f"{v:.4g}"
    return str(v)


def summary_lines(job: dict) -> list[str]:
    """Human summary of a job: status, error, the metrics that say whether adaptation helped."""
    out = [f"job {job['id']}  {job['status']}  method {job['method']}"]
    if job.get("error"):
        out.append(f"error {job['error']['code']}: {job['error']['message']}")
    m = job.get("metrics") or {}
    if m:
        if m.get("accuracy_before") is not None:
            delta = m["accuracy_after"] - m["accuracy_before"]
            out.append(f"accuracy   {_fmt(m['accuracy_before'], True)} -> {_fmt(m['accuracy_after'], True)}  "
                       f"({delta:+.1%})")
        out.append(f"entropy    {_fmt(m.get('entropy_before'))} -> {_fmt(m.get('entropy_after'))}   "
                   f"agreement with source {_fmt(m.get('agreement_with_source'), True)}   "
                   f"estimated accuracy {_fmt(m.get('estimated_accuracy_after'), True)}")
        out.append(f"predicted-class entropy {_fmt(m.get('predicted_class_entropy_after'))}   "
                   f"collapse detected: {_fmt(m.get('collapse_detected'))}   "
                   f"{_fmt(m.get('images_per_second'))} images/s")
    return out


# --- following a job ------------------------------------------------------------------------------------

def follow(client, job_id: str, line: Line, poll: float = 1.0) -> dict:
    """Live progress from the SSE stream (polling when the server has none); returns the final job."""
    from .client import ApiError

    state = {"status": "queued", "phase": None, "done": 0, "total": 0, "ips": None, "eta": None, "step": None}

    def render(force: bool = False) -> None:
        total = state["total"] or 0
        frac = state["done"] / total if total else 0.0
        text = f"{state['status']:9s} {state['phase'] or '':18s}"
        if total:
            text += f" {bar(frac)} {state['done']}/{total} batches"
        if state["ips"]:
            text += f"  {state['ips']:.0f} img/s  ETA {human_duration(state['eta'])}"
        step = state["step"]
        if step and step.get("loss") is not None:
            text += f"  loss {step['loss']:.4f}"
        if step and step.get("entropy") is not None:
            text += f"  H {step['entropy']:.3f}"
        line.show(text, key=(state["status"], state["phase"]), force=force)

    try:
        for ev in client.events(job_id):
            if ev.event in ("status", "end"):
                state["status"] = ev.data["status"]
                p = ev.data["progress"]
                state.update(phase=p["phase"], done=p["done"], total=p["total"])
                if ev.event == "end":
                    render(force=True)
                    line.done()
                    return ev.data
            elif ev.event == "progress":
                d = ev.data
                state.update(status=d.get("status", state["status"]), phase=d["phase"], done=d["done"],
                             total=d["total"])
                if d.get("images_per_second"):
                    state.update(ips=d["images_per_second"], eta=d.get("eta_s"))
                elif d["phase"] != "adapting":
                    state.update(ips=None, eta=None)
            elif ev.event == "step":
                state["step"] = ev.data
            render()
    except ApiError as exc:
        if exc.status != 404 or exc.code == "job_not_found":
            raise
    # A server without the events endpoint: poll.
    def on_update(job):
        p = job["progress"]
        state.update(status=job["status"], phase=p["phase"], done=p["done"], total=p["total"])
        render()

    job = client.wait(job_id, on_update=on_update, poll=poll)
    line.done()
    return job


def finish(client, job: dict, args, line: Line) -> int:
    """After a watched job: summary, download of the adapted weights, exit code."""
    for text in summary_lines(job):
        print(text, file=sys.stderr)
    code = STATUS_EXIT.get(job["status"], EXIT_OK)
    if job["status"] == "succeeded" and not getattr(args, "no_download", False):
        dest = Path(args.output) if args.output else Path(f"adapted-{job['id'][:8]}.safetensors")
        path = client.download(job["id"], "model.safetensors", dest,
                               on_progress=transfer_progress("download model.safetensors", line))
        line.done()
        print(f"adapted weights: {path}", file=sys.stderr)
    if args.json:
        _print_json(job)
    return code


# --- commands -------------------------------------------------------------------------------------------

def cmd_submit(args) -> int:
    from .client import build_spec

    base = None
    if args.spec:
        try:
            base = json.loads(Path(args.spec).read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"--spec {args.spec}: {exc}") from None
        if not isinstance(base, dict):
            raise UsageError(f"--spec {args.spec}: must hold a JSON object")
    arch_kwargs = parse_pairs(args.arch_kwarg, "--arch-kwarg")
    if args.arch_kwargs:
        parsed = parse_value(args.arch_kwargs)
        if not isinstance(parsed, dict):
            raise UsageError("--arch-kwargs takes a JSON object")
        arch_kwargs = {**parsed, **arch_kwargs}
    preprocess = {k: v for k, v in {"size": args.size, "channels": args.channels,
                                    "mean": parse_floats(args.mean, "--mean"),
                                    "std": parse_floats(args.std, "--std")}.items() if v is not None}
    options = {k: v for k, v in {"batch_size": args.batch_size, "epochs": args.epochs, "seed": args.seed,
                                 "device": args.device, "precision": args.precision}.items() if v is not None}
    fields = dict(method=args.method, params=parse_pairs(args.param, "--param"), architecture=args.arch,
                  num_classes=args.num_classes, arch_kwargs=arch_kwargs, model_format=args.model_format,
                  data_format=args.data_format, eval_format=args.eval_format, preprocess=preprocess,
                  options=options, notify_url=args.notify_url)
    # Check what is required before uploading anything.
    placeholder = {"upload_id": "<file>"}
    draft = build_spec(base, **fields, model=placeholder if args.model else None,
                       data=placeholder if args.data else None,
                       eval_data=placeholder if args.eval_data else None)
    missing = [flag for flag, ok in [("--method", draft.get("method")),
                                     ("--model", (draft.get("model") or {}).get("upload_id")),
                                     ("--arch", (draft.get("model") or {}).get("architecture")),
                                     ("--num-classes", (draft.get("model") or {}).get("num_classes")),
                                     ("--data", (draft.get("data") or {}).get("upload_id"))] if not ok]
    if missing:
        raise UsageError(f"submit needs {', '.join(missing)} (as flags or in --spec)")
    for flag, value in (("--model", args.model), ("--data", args.data), ("--eval-data", args.eval_data)):
        if value and not Path(value).is_file() and Path(value).suffix:
            raise UsageError(f"{flag}: no such file: {value}")

    line = Line(quiet=args.quiet)
    with _client(args) as client:
        def on_upload(path: Path, kind: str):
            return transfer_progress(f"upload {path.name}", line)

        refs = {}
        for name, value in (("model", args.model), ("data", args.data), ("eval_data", args.eval_data)):
            if value:
                refs[name] = client.upload_ref(value, "model" if name == "model" else "dataset", on_upload)
                line.done()
        job = client.submit(build_spec(base, **fields, **refs), idempotency_key=args.idempotency_key)
        print(f"submitted {job['method']} job {job['id']} ({job['status']})", file=sys.stderr)
        if not args.watch:
            if args.json:
                _print_json(job)
            else:
                print(job["id"])
            return EXIT_OK
        try:
            job = follow(client, job["id"], line)
        except KeyboardInterrupt:
            line.done()
            print(f"\nstopped watching; the job goes on: adaptd status {job['id']}", file=sys.stderr)
            return 130
        return finish(client, job, args, line)


def cmd_jobs(args) -> int:
    with _client(args) as client:
        page = client.jobs(status=args.status, limit=args.limit)
    if args.json:
        _print_json(page)
        return EXIT_OK
    rows = [("ID", "STATUS", "METHOD", "CREATED", "PROGRESS", "ACCURACY", "COLLAPSE")]
    for j in page["items"]:
        m = j.get("metrics") or {}
        acc = (f"{m['accuracy_before']:.1%}->{m['accuracy_after']:.1%}"
               if m.get("accuracy_before") is not None else "-")
        p = j["progress"]
        prog = f"{p['done']}/{p['total']} {p['phase'] or ''}".strip() if j["status"] == "running" \
            else f"{p['fraction']:.0%}"
        rows.append((j["id"], j["status"], j["method"], j["created_at"][:19].replace("T", " "), prog, acc,
                     _fmt(m.get("collapse_detected")) if m else "-"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    if page.get("next_cursor"):
        print(f"(more: --limit {args.limit * 2})", file=sys.stderr)
    return EXIT_OK


def cmd_status(args) -> int:
    with _client(args) as client:
        if args.watch:
            job = client.job(args.job_id)
            if job["status"] not in STATUS_EXIT:
                job = follow(client, args.job_id, Line(quiet=args.quiet))
        else:
            job = client.job(args.job_id)
    if args.json:
        _print_json(job)
    else:
        p = job["progress"]
        print(f"id          {job['id']}")
        print(f"status      {job['status']}" + ("  (cancel requested)" if job["cancel_requested"]
                                                 and job["status"] == "running" else ""))
        print(f"method      {job['method']}  {json.dumps(job['params'], separators=(',', ':'))}")
        print(f"created     {job['created_at']}")
        print(f"started     {job['started_at'] or '-'}")
        print(f"finished    {job['finished_at'] or '-'}")
        print(f"progress    {p['done']}/{p['total']} batches ({p['fraction']:.0%}) {p['phase'] or ''}")
        for text in summary_lines(job)[1:]:
            print(text)
        for a in job["artifacts"]:
            print(f"artifact    {a['name']}  {human_bytes(a['size'])}  sha256 {a['sha256'][:16]}…")
    return STATUS_EXIT.get(job["status"], EXIT_OK)


def cmd_download(args) -> int:
    line = Line(quiet=args.quiet)
    with _client(args) as client:
        dest = Path(args.output) if args.output else None
        path = client.download(args.job_id, args.artifact, dest,
                               on_progress=transfer_progress(f"download {args.artifact}", line))
    line.done()
    print(path)
    return EXIT_OK


def cmd_cancel(args) -> int:
    with _client(args) as client:
        job = client.cancel(args.job_id)
    if args.json:
        _print_json(job)
    elif job["status"] == "running":
        print(f"{job['id']}: cancel requested; the worker stops at the next batch")
    else:
        print(f"{job['id']}: {job['status']}")
    return EXIT_OK


def _schema_type(prop: dict) -> str:
    if "enum" in prop:
        return "|".join(map(str, prop["enum"]))
    if "const" in prop:
        return json.dumps(prop["const"])
    if "anyOf" in prop:
        return " or ".join(_schema_type(p) for p in prop["anyOf"])
    t = prop.get("type", "any")
    if t == "array" and isinstance(prop.get("items"), dict):
        return f"list[{_schema_type(prop['items'])}]"
    return {"number": "float", "integer": "int", "boolean": "bool", "string": "str", "null": "null"}.get(t, t)


def cmd_methods(args) -> int:
    with _client(args) as client:
        methods = client.methods()
    if args.name:
        methods = [m for m in methods if m["name"] == args.name]
        if not methods:
            print(f"error: unknown method {args.name!r}", file=sys.stderr)
            return EXIT_USAGE
    if args.json:
        _print_json(methods)
        return EXIT_OK
    for m in methods:
        flags = [f for f, on in (("needs labels", m["needs_labels"]),
                                 ("needs source statistics", m["needs_source_statistics"]),
                                 ("updates weights", m["updates_weights"])) if on]
        print(f"{m['name']}  ({m['kind']}{'; ' + ', '.join(flags) if flags else ''})")
        for text in textwrap.wrap(m["description"], 96):
            print(f"    {text}")
        props = (m.get("params_schema") or {}).get("properties") or {}
        for name, prop in props.items():
            default = json.dumps(prop["default"]) if "default" in prop else "(required)"
            print(f"    --param {name}=…  {_schema_type(prop)}, default {default}")
            for text in textwrap.wrap(prop.get("description", ""), 88):
                print(f"          {text}")
        print()
    return EXIT_OK


# --- registration ---------------------------------------------------------------------------------------

def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Map errors to the documented exit codes, with a one-line message."""

    def run(args) -> int:
        import httpx

        from .client import ApiError

        try:
            return fn(args)
        except KeyboardInterrupt:
            print("\ninterrupted (a submitted job goes on: adaptd status ID)", file=sys.stderr)
            return 130
        except UsageError as exc:
            print(f"adaptd {args.command}: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except FileNotFoundError as exc:
            print(f"adaptd {args.command}: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except ApiError as exc:
            print(f"error: {exc.code}: {exc.message} (HTTP {exc.status})", file=sys.stderr)
            for e in (exc.detail or {}).get("errors", [])[:5]:
                print(f"  {e.get('field') or '.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}", file=sys.stderr)
            return EXIT_API
        except httpx.HTTPError as exc:
            from .client import resolve_connection

            url = resolve_connection(args.url, args.api_key)[0]
            print(f"error: connection_failed: cannot reach the adaptd server at {url}: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)
            return EXIT_API

    return run


def register(sub) -> None:
    """Add the client subcommands to the `adaptd` parser's subparsers."""
    conn = argparse.ArgumentParser(add_help=False)
    g = conn.add_argument_group("server")
    g.add_argument("--url", default=None, help="server URL (else ADAPTD_URL, the config file, "
                   "http://127.0.0.1:8000)")
    g.add_argument("--api-key", default=None, help="API key (else ADAPTD_API_KEY, the config file)")
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--json", action="store_true", help="print JSON on stdout")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("submit", parents=[conn, out], formatter_class=fmt,
                       help="upload model and data, submit a job, optionally follow it (--watch)",
                       description="Upload the files, submit an adaptation job, and with --watch follow it "
                       "to the end and download the adapted weights.",
                       epilog="example:\n  adaptd submit --method tent --param lr=1e-3 --model model.safetensors "
                       "--arch resnet18 --num-classes 10 \\\n      --data target.npz --eval-data labelled.npz "
                       "--size 32 --mean 0.5,0.5,0.5 --std 0.5,0.5,0.5 --watch\n\n"
                       "exit codes: 0 succeeded, 1 failed, 2 usage error, 3 cancelled, 4 connection/API error")
    p.add_argument("--spec", help="a job spec JSON file; the flags below override its fields")
    p.add_argument("--method", help="adaptation method (adaptd methods)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="method parameter, JSON-typed (lr=1e-3, collapse_guard=false); repeatable")
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="FILE|UPLOAD_ID", help="source checkpoint (uploaded) or an upload id")
    g.add_argument("--model-format", choices=["safetensors", "pt"])
    g.add_argument("--arch", "--architecture", dest="arch", help="architecture name (resnet18, digit_cnn, ...)")
    g.add_argument("--num-classes", type=int)
    g.add_argument("--arch-kwarg", action="append", metavar="KEY=VALUE", help="architecture keyword; repeatable")
    g.add_argument("--arch-kwargs", metavar="JSON", help="architecture keywords as a JSON object")
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="FILE|UPLOAD_ID", help="unlabelled target data (npz, zip, tar, parquet, "
                   "a zipped Hugging Face save_to_disk folder); detected when no format is given")
    g.add_argument("--data-format", choices=["npz", "zip", "tar", "parquet", "hf_dataset"])
    g.add_argument("--eval-data", metavar="FILE|UPLOAD_ID", help="labelled data: accuracy before and after")
    g.add_argument("--eval-format", choices=["npz", "zip", "tar", "parquet", "hf_dataset"])
    g = p.add_argument_group("preprocess")
    g.add_argument("--size", type=int, help="square resize")
    g.add_argument("--channels", type=int, choices=[1, 3])
    g.add_argument("--mean", help="per-channel mean, comma-separated")
    g.add_argument("--std", help="per-channel std, comma-separated")
    g = p.add_argument_group("options")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--epochs", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    g = p.add_argument_group("submission")
    g.add_argument("--notify-url", help="POST the final job here (signed webhook)")
    g.add_argument("--idempotency-key", help="the same key and spec return the same job")
    g.add_argument("-w", "--watch", action="store_true", help="follow the job to its end, then download")
    g.add_argument("-o", "--output", help="where --watch saves model.safetensors "
                   "(default adapted-<id>.safetensors)")
    g.add_argument("--no-download", action="store_true", help="with --watch: do not download the weights")
    p.set_defaults(func=_guarded(cmd_submit))

    p = sub.add_parser("jobs", parents=[conn, out], help="list jobs, newest first")
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=_guarded(cmd_jobs))

    p = sub.add_parser("status", parents=[conn, out], help="one job: status, progress, metrics, artifacts "
                       "(exit code: 0 succeeded/in progress, 1 failed, 3 cancelled)")
    p.add_argument("job_id")
    p.add_argument("-w", "--watch", action="store_true", help="follow the job until it ends")
    p.set_defaults(func=_guarded(cmd_status))

    p = sub.add_parser("download", parents=[conn, out], help="download an artifact of a job")
    p.add_argument("job_id")
    p.add_argument("artifact", nargs="?", default="model.safetensors",
                   help="model.safetensors (default), metrics.json, history.json or examples.json")
    p.add_argument("-o", "--output", help="file or folder (default: the artifact's name here)")
    p.set_defaults(func=_guarded(cmd_download))

    p = sub.add_parser("cancel", parents=[conn, out], help="cancel a job (queued: at once; running: next batch)")
    p.add_argument("job_id")
    p.set_defaults(func=_guarded(cmd_cancel))

    p = sub.add_parser("methods", parents=[conn, out], help="the adaptation methods and their parameters")
    p.add_argument("name", nargs="?", help="show only this method")
    p.set_defaults(func=_guarded(cmd_methods))
