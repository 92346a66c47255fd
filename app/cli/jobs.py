"""Client commands on jobs: submit, jobs, status, download, cancel, logs. Everything goes through the
REST API (app.client), so they work against any adaptd server. A JOB is a full id or any unique prefix
of at least 6 characters (the 8 that `adaptd jobs` shows)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import click

from ..contract.jobs import DatasetFormat
from ..contract.tasks import TASKS

from .options import (EXIT_INTERRUPTED, EXIT_OK, JOB_STATUSES, STATUS_EXIT, connection_options, guarded,
                      job_argument, make_client, output_options, parse_floats, parse_pairs, parse_value)
from .render import Line, job_table, job_view, json_text, log_line, transfer_progress
from .watch import finish, follow

FORMATS = click.Choice(list(get_args(DatasetFormat)))
SUBMIT_EPILOG = """\b
example:
  adaptd submit --method tent --param lr=1e-3 --model model.safetensors --arch resnet18 \\
      --num-classes 10 --data target.npz --eval-data labelled.npz --size 32 \\
      --mean 0.5,0.5,0.5 --std 0.5,0.5,0.5 --name first-try --tag cifar --watch

detection (torchvision detector; eval boxes as COCO JSON beside the images in a zip):
  adaptd submit --task detection --method mean_teacher --model detector.safetensors \
      --arch fasterrcnn_mobilenet_v3_large_fpn --num-classes 11 --data target.zip --eval-data coco.zip --watch

exit codes: 0 succeeded, 1 failed, 2 usage error, 3 cancelled, 4 connection/API error"""


def read_prior(path: str) -> list:
    """--prior FILE: JSON (a list of K numbers, or a list of such lists) or CSV (one row per image)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise click.UsageError(f"--prior {path}: {exc}") from None
    try:
        value = json.loads(text)
    except ValueError:
        try:
            rows = [[float(v) for v in line.split(",")] for line in text.splitlines() if line.strip()]
        except ValueError:
            raise click.UsageError(f"--prior {path}: neither JSON nor a CSV of numbers") from None
        value = rows[0] if len(rows) == 1 else rows
    if not isinstance(value, list) or not value:
        raise click.UsageError(f"--prior {path}: must hold a list of proportions")
    return value


@click.command("submit", epilog=SUBMIT_EPILOG, short_help="upload, submit a job, follow it (--watch)")
@click.option("--spec", "spec_file", metavar="FILE", help="a job spec JSON file; the flags below override its fields")
@click.option("--method", help="adaptation method (adaptd methods)")
@click.option("--task", type=click.Choice(list(TASKS)), help="what the model predicts (default classification)")
@click.option("--prior", "prior_file", metavar="FILE",
              help="sfda_prior's class_ratio_prior: a JSON list (K proportions, or one list per target image) or "
              "a CSV with one row of K numbers per image")
@click.option("--param", multiple=True, metavar="KEY=VALUE",
              help="method parameter, JSON-typed (lr=1e-3, collapse_guard=false); repeatable")
@click.option("--model", metavar="FILE|UPLOAD_ID", help="source checkpoint (uploaded) or an upload id")
@click.option("--model-format", type=click.Choice(["safetensors", "pt"]))
@click.option("--arch", "--architecture", "arch", help="architecture name (resnet18, digit_cnn, ...)")
@click.option("--num-classes", type=int)
@click.option("--arch-kwarg", multiple=True, metavar="KEY=VALUE", help="architecture keyword; repeatable")
@click.option("--arch-kwargs", metavar="JSON", help="architecture keywords as a JSON object")
@click.option("--data", metavar="FILE|UPLOAD_ID", help="unlabelled target data (npz, zip, tar, parquet, a zipped Hugging Face save_to_disk folder); "
              "detected when no format is given")
@click.option("--data-format", type=FORMATS)
@click.option("--eval-data", metavar="FILE|UPLOAD_ID",
              help="labelled data: accuracy (mIoU, mAP) before and after; detection: npz with boxes/labels/"
              "image_index, or an archive of images with a COCO JSON")
@click.option("--eval-format", type=FORMATS)
@click.option("--size", type=int, help="square resize")
@click.option("--channels", type=click.Choice(["1", "3"]))
@click.option("--mean", help="per-channel mean, comma-separated")
@click.option("--std", help="per-channel std, comma-separated")
@click.option("--batch-size", type=int)
@click.option("--epochs", type=int)
@click.option("--seed", type=int)
@click.option("--device", help="auto, cpu, cuda, cuda:N")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]))
@click.option("--name", help="a name to find the run again (adaptd jobs --name)")
@click.option("--tag", "tags", multiple=True, help="a tag to find the run again; repeatable")
@click.option("--notify-url", help="POST the final job here (signed webhook)")
@click.option("--idempotency-key", help="the same key and spec return the same job")
@click.option("-w", "--watch", is_flag=True, help="follow the job to its end, then download")
@click.option("-o", "--output", help="where --watch saves model.safetensors (default adapted-<id>.safetensors)")
@click.option("--no-download", is_flag=True, help="with --watch: do not download the weights")
@connection_options
@output_options
@guarded
def submit(spec_file, method, task, prior_file, param, model, model_format, arch, num_classes, arch_kwarg,
           arch_kwargs, data,
           data_format, eval_data, eval_format, size, channels, mean, std, batch_size, epochs, seed, device,
           precision, name, tags, notify_url, idempotency_key, watch, output, no_download, url, api_key,
           as_json, quiet) -> int:
    """Upload the files, submit an adaptation job, and with --watch follow it to the end and download
    the adapted weights."""
    from ..client import build_spec

    base = None
    if spec_file:
        try:
            base = json.loads(Path(spec_file).read_text())
        except (OSError, ValueError) as exc:
            raise click.UsageError(f"--spec {spec_file}: {exc}") from None
        if not isinstance(base, dict):
            raise click.UsageError(f"--spec {spec_file}: must hold a JSON object")
    params = parse_pairs(param, "--param")
    if prior_file:
        params["class_ratio_prior"] = read_prior(prior_file)
    kwargs = parse_pairs(arch_kwarg, "--arch-kwarg")
    if arch_kwargs:
        parsed = parse_value(arch_kwargs)
        if not isinstance(parsed, dict):
            raise click.UsageError("--arch-kwargs takes a JSON object")
        kwargs = {**parsed, **kwargs}
    preprocess = {k: v for k, v in {"size": size, "channels": int(channels) if channels else None,
                                    "mean": parse_floats(mean, "--mean"),
                                    "std": parse_floats(std, "--std")}.items() if v is not None}
    options = {k: v for k, v in {"batch_size": batch_size, "epochs": epochs, "seed": seed, "device": device,
                                 "precision": precision}.items() if v is not None}
    fields = dict(task=task, method=method, params=params, architecture=arch,
                  num_classes=num_classes, arch_kwargs=kwargs, model_format=model_format,
                  data_format=data_format, eval_format=eval_format, preprocess=preprocess, options=options,
                  notify_url=notify_url, name=name, tags=list(tags) or None)
    # Check what is required before uploading anything (--arch and --num-classes may come from the
    # model's adaptd metadata: the server says so if they cannot).
    placeholder = {"upload_id": "<file>"}
    draft = build_spec(base, **fields, model=placeholder if model else None,
                       data=placeholder if data else None, eval_data=placeholder if eval_data else None)
    missing = [flag for flag, ok in [("--method", draft.get("method")),
                                     ("--model", (draft.get("model") or {}).get("upload_id")),
                                     ("--data", (draft.get("data") or {}).get("upload_id"))] if not ok]
    if missing:
        raise click.UsageError(f"submit needs {', '.join(missing)} (as flags or in --spec)")
    for flag, value in (("--model", model), ("--data", data), ("--eval-data", eval_data)):
        if value and not Path(value).is_file() and Path(value).suffix:
            raise click.UsageError(f"{flag}: no such file: {value}")

    line = Line(quiet=quiet)
    with make_client(url, api_key) as client:
        refs = {}
        for field, value in (("model", model), ("data", data), ("eval_data", eval_data)):
            if value:
                refs[field] = client.upload_ref(value, "model" if field == "model" else "dataset",
                                                lambda path, _kind: transfer_progress(f"upload {path.name}", line))
                line.done()
        job = client.submit(build_spec(base, **fields, **refs), idempotency_key=idempotency_key)
        click.echo(f"submitted {job['method']} job {job['id']} ({job['status']})", err=True)
        if not watch:
            click.echo(json_text(job) if as_json else job["id"])
            return EXIT_OK
        try:
            job = follow(client, job["id"], line)
        except KeyboardInterrupt:
            line.done()
            click.echo(f"\nstopped watching; the job goes on: adaptd status {job['id'][:8]}", err=True)
            return EXIT_INTERRUPTED
        return finish(client, job, line, output, download=not no_download, as_json=as_json)


@click.command("jobs", short_help="list jobs, newest first (filter by name, tag)")
@click.option("--status", type=click.Choice(JOB_STATUSES))
@click.option("--name", help="only jobs with this name")
@click.option("--tag", "tags", multiple=True, help="only jobs with this tag; repeatable (all must match)")
@click.option("--limit", type=click.IntRange(1, 500), default=20, show_default=True)
@connection_options
@output_options
@guarded
def jobs(status, name, tags, limit, url, api_key, as_json, quiet) -> int:
    """List jobs, newest first."""
    with make_client(url, api_key) as client:
        page = client.jobs(status=status, limit=limit, name=name, tags=list(tags) or None)
    if as_json:
        click.echo(json_text(page))
        return EXIT_OK
    for text in job_table(page["items"]):
        click.echo(text)
    if page.get("next_cursor"):
        click.echo(f"(more: --limit {min(limit * 2, 500)})", err=True)
    return EXIT_OK


@click.command("status", short_help="one job: status, progress, metrics")
@job_argument
@click.option("-w", "--watch", is_flag=True, help="follow the job until it ends")
@connection_options
@output_options
@guarded
def status(job_id, watch, url, api_key, as_json, quiet) -> int:
    """One job: status, progress, metrics, artifacts (exit code: 0 succeeded or in progress, 1 failed,
    3 cancelled)."""
    with make_client(url, api_key) as client:
        job = client.job(job_id)
        if watch and job["status"] not in STATUS_EXIT:
            job = follow(client, job["id"], Line(quiet=quiet))
    for text in [json_text(job)] if as_json else job_view(job):
        click.echo(text)
    return STATUS_EXIT.get(job["status"], EXIT_OK)


@click.command("download", short_help="download an artifact of a job")
@job_argument
@click.argument("artifact", default="model.safetensors", required=False,
                shell_complete=lambda *_: ["model.safetensors", "metrics.json", "history.json"])
@click.option("-o", "--output", help="file or folder (default: the artifact's name here)")
@connection_options
@output_options
@guarded
def download(job_id, artifact, output, url, api_key, as_json, quiet) -> int:
    """Download an artifact of a job: model.safetensors (default), metrics.json or history.json."""
    line = Line(quiet=quiet)
    with make_client(url, api_key) as client:
        path = client.download(job_id, artifact, Path(output) if output else None,
                               on_progress=transfer_progress(f"download {artifact}", line))
    line.done()
    click.echo(path)
    return EXIT_OK


@click.command("cancel", short_help="cancel a job")
@job_argument
@connection_options
@output_options
@guarded
def cancel(job_id, url, api_key, as_json, quiet) -> int:
    """Cancel a job (queued: at once; running: at the next batch)."""
    with make_client(url, api_key) as client:
        job = client.cancel(job_id)
    if as_json:
        click.echo(json_text(job))
    elif job["status"] == "running":
        click.echo(f"{job['id']}: cancel requested; the worker stops at the next batch")
    else:
        click.echo(f"{job['id']}: {job['status']}")
    return EXIT_OK


@click.command("logs", short_help="the job's own log lines (--follow)")
@job_argument
@click.option("-f", "--follow", "follow_", is_flag=True, help="keep printing new lines until the job ends")
@connection_options
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@guarded
def logs(job_id, follow_, url, api_key, as_json) -> int:
    """The job's own log lines, as its worker wrote them."""
    with make_client(url, api_key) as client:
        for row in client.logs(job_id, follow=follow_):
            click.echo(json.dumps(row) if as_json else log_line(row))
    return EXIT_OK


COMMANDS = (submit, jobs, status, download, cancel, logs)
