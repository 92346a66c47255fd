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

\b
detection (a torchvision detector; eval boxes as COCO JSON beside the images in a zip, or npz boxes):
  adaptd submit --task detection --method mean_teacher --model detector.safetensors \\
      --arch fasterrcnn_mobilenet_v3_large_fpn --num-classes 11 --data target.zip --eval-data coco.zip --watch

\b
several source models distilled into one student (distill_nearest, distill_weighted):
  adaptd submit --method distill_weighted --model mnist.safetensors --model usps.safetensors \\
      --model letters.safetensors@digit_cnn,26 --arch digit_cnn --num-classes 10 --student-arch digit_cnn \\
      --data target.npz --labelled-data few_labels.npz --eval-data labelled.npz --watch
  (--model FILE|UPLOAD_ID[@ARCH[,NUM_CLASSES]]: a source without its own @ARCH or NUM_CLASSES takes
  --arch, --num-classes, else its checkpoint's adaptd metadata; --arch-kwarg applies to the sources of
  the --arch architecture; the student takes --num-classes unless --student-num-classes)

\b
several methods, one picked without labels:
  adaptd submit --method auto --candidates bn_adapt,tent,shot --model model.safetensors \\
      --data target.npz --watch

exit codes: 0 succeeded, 1 failed, 2 usage error, 3 cancelled, 4 connection/API error"""


def parse_source(value: str) -> tuple[str, dict]:
    """--model FILE|UPLOAD_ID[@ARCH[,NUM_CLASSES]] -> (file or id, its own architecture fields). An
    existing file is taken whole (its name may hold an @)."""
    if Path(value).is_file() or "@" not in value:
        return value, {}
    ref, _, rest = value.rpartition("@")
    arch, _, n = rest.partition(",")
    own: dict = {}
    if arch:
        own["architecture"] = arch
    if n:
        try:
            own["num_classes"] = int(n)
        except ValueError:
            raise click.UsageError(f"--model {value}: FILE@ARCH,NUM_CLASSES takes a whole number of classes, "
                                   f"got {n!r}") from None
    if not ref or not own:
        raise click.UsageError(f"--model {value}: FILE|UPLOAD_ID[@ARCH[,NUM_CLASSES]]")
    return ref, own


INLINE_PRIOR_BYTES = 64 * 1024  # a JSON list this small travels inline in the spec; anything else is uploaded


def inline_prior(path: str) -> list | None:
    """--prior FILE: a small JSON list (K proportions, or one list per target image) goes inline as
    `params.class_ratio_prior`; None: upload the file (`params.prior_upload`: CSV, JSON objects with
    sizes and tags, large files)."""
    p = Path(path)
    try:
        if p.stat().st_size > INLINE_PRIOR_BYTES:
            return None
        value = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, list) and value else None


@click.command("submit", epilog=SUBMIT_EPILOG, short_help="upload, submit a job, follow it (--watch)")
@click.option("--spec", "spec_file", metavar="FILE", help="a job spec JSON file; the flags below override its fields")
@click.option("--method", help="adaptation method (adaptd methods)")
@click.option("--task", type=click.Choice(list(TASKS)), help="what the model predicts (default classification)")
@click.option("--prior", "prior_file", metavar="FILE|UPLOAD_ID",
              help="sfda_prior's class-ratio prior: a JSON list (K proportions, or one list per target image) "
              "goes inline; a CSV (header: class names or indices) or a JSON {\"sizes\", \"tags\"} / "
              "{\"proportions\"} file is uploaded (params.prior_upload). Formats: README, Segmentation data")
@click.option("--param", multiple=True, metavar="KEY=VALUE",
              help="method parameter, JSON-typed (lr=1e-3, collapse_guard=false); repeatable")
@click.option("--candidates", metavar="M1,M2,...", help="--method auto: the methods to run and pick from "
              "(default: the catalogue's set; adaptd methods)")
@click.option("--model", "models", multiple=True, metavar="FILE|UPLOAD_ID[@ARCH[,N]]",
              help="source checkpoint (uploaded) or an upload id; repeat it for several source models "
              "(distill_nearest, distill_weighted), optionally each with its own architecture and class count")
@click.option("--model-format", type=click.Choice(["safetensors", "pt"]))
@click.option("--arch", "--architecture", "arch", help="architecture name (resnet18, digit_cnn, ...)")
@click.option("--num-classes", type=int)
@click.option("--arch-kwarg", multiple=True, metavar="KEY=VALUE", help="architecture keyword; repeatable")
@click.option("--arch-kwargs", metavar="JSON", help="architecture keywords as a JSON object")
@click.option("--student-arch", help="several source models: the student's architecture (the model the job "
              "trains and exports)")
@click.option("--student-num-classes", type=int, help="the student's classes (default --num-classes)")
@click.option("--student-arch-kwarg", multiple=True, metavar="KEY=VALUE", help="student architecture keyword; "
              "repeatable")
@click.option("--student-weights", metavar="FILE|UPLOAD_ID", help="the student's initial weights (default: "
              "freshly initialised; a model adaptd exported needs no --student-arch)")
@click.option("--labelled-data", metavar="FILE|UPLOAD_ID", help="several source models: a few labelled target "
              "images (similarity pseudo-labels and a supervised loss)")
@click.option("--labelled-format", type=FORMATS)
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
@click.option("--compile", "compile_", type=click.Choice(["auto", "on", "off"]),
              help="torch.compile the adapted model (auto: on CUDA, for jobs long enough to repay it)")
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
def submit(spec_file, method, task, prior_file, param, candidates, models, model_format, arch, num_classes,
           arch_kwarg, arch_kwargs, student_arch, student_num_classes, student_arch_kwarg, student_weights,
           labelled_data, labelled_format, data, data_format, eval_data, eval_format, size, channels, mean, std, batch_size, epochs, seed, device,
           precision, compile_, name, tags, notify_url, idempotency_key, watch, output, no_download, url, api_key,
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
    prior_rows = inline_prior(prior_file) if prior_file else None
    if prior_rows is not None:
        params["class_ratio_prior"] = prior_rows
    if candidates:
        if (method or (base or {}).get("method")) != "auto":
            raise click.UsageError("--candidates is for --method auto")
        params["candidates"] = [c.strip() for c in candidates.split(",") if c.strip()]
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
                                 "precision": precision, "compile": compile_}.items() if v is not None}
    sources = [parse_source(v) for v in models]
    multisource = len(sources) > 1 or bool(student_arch or student_weights) or (base or {}).get("models") is not None
    student = None
    if student_arch or student_num_classes or student_arch_kwarg or student_weights:
        if not multisource:
            raise click.UsageError("--student-* flags are for several source models (distill_nearest, "
                                   "distill_weighted)")
        student = {k: v for k, v in {"architecture": student_arch,
                                     "num_classes": student_num_classes or num_classes}.items() if v is not None}
        if student_arch_kwarg:
            student["arch_kwargs"] = parse_pairs(student_arch_kwarg, "--student-arch-kwarg")
    if len(sources) > 1 and not (student_arch or student_weights or (base or {}).get("student")):
        raise click.UsageError("several --model: the job trains a student; give its architecture (--student-arch) "
                               "or initial weights adaptd exported (--student-weights)")
    if labelled_data and not multisource:
        raise click.UsageError("--labelled-data is for several source models (distill_nearest, distill_weighted)")
    fields = dict(task=task, method=method, params=params, architecture=arch,
                  num_classes=num_classes, arch_kwargs=kwargs, model_format=model_format,
                  data_format=data_format, eval_format=eval_format, labelled_format=labelled_format,
                  preprocess=preprocess, options=options,
                  notify_url=notify_url, name=name, tags=list(tags) or None, student=student)
    # Check what is required before uploading anything (--arch and --num-classes may come from the
    # model's adaptd metadata: the server says so if they cannot).
    placeholder = {"upload_id": "<file>"}
    if multisource:
        fields["models"] = [{**placeholder, **own} for _, own in sources] if sources else None
    else:
        fields.update({k: v for k, v in (sources[0][1] if sources else {}).items()})
    draft = build_spec(base, **fields, model=placeholder if sources and not multisource else None,
                       data=placeholder if data else None, eval_data=placeholder if eval_data else None)
    has_model = (draft.get("model") or {}).get("upload_id") or draft.get("models")
    missing = [flag for flag, ok in [("--method", draft.get("method")), ("--model", has_model),
                                     ("--data", (draft.get("data") or {}).get("upload_id"))] if not ok]
    if missing:
        raise click.UsageError(f"submit needs {', '.join(missing)} (as flags or in --spec)")
    for flag, value in ([("--model", ref) for ref, _ in sources] + [("--student-weights", student_weights),
                        ("--data", data), ("--eval-data", eval_data), ("--labelled-data", labelled_data),
                        ("--prior", prior_file)]):
        if value and not Path(value).is_file() and Path(value).suffix:
            raise click.UsageError(f"{flag}: no such file: {value}")

    line = Line(quiet=quiet)
    with make_client(url, api_key) as client:
        def upload(value, kind):
            ref = client.upload_ref(value, kind, lambda path, _kind: transfer_progress(f"upload {path.name}", line))
            line.done()
            return ref

        refs = {}
        for field, value in (("data", data), ("eval_data", eval_data), ("labelled_data", labelled_data)):
            if value:
                refs[field] = upload(value, "dataset")
        if multisource:
            if sources:
                fields["models"] = [{**upload(ref, "model"), **own} for ref, own in sources]
            if student_weights:
                fields["student"] = {**(student or {}), **upload(student_weights, "model")}
        elif sources:
            refs["model"] = upload(sources[0][0], "model")
        if prior_file and prior_rows is None:
            fields["params"] = {**params, "prior_upload": upload(prior_file, "prior")["upload_id"]}
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
