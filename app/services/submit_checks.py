"""The checks a job spec passes at submit beyond its schema, torch-free, reading only the bytes they
need from the uploads: the model's format, safety and keys/shapes against the architecture key
manifest; architecture, num_classes, arch_kwargs and preprocess completed from the model's adaptd
metadata and the architecture's defaults; the datasets' format and npz headers; an optional library
some live worker must have. Each refusal is the error the worker would have failed the job with."""
from __future__ import annotations

from pydantic import ValidationError

from ..checks import CheckError, manifest
from ..checks.blobfile import open_blob
from ..checks.checkpoints import inspect_checkpoint
from ..checks.datasets import check_dataset
from ..checks.metadata import decode
from ..checks.preprocess import resolve
from ..checks.priors import MAX_PRIOR_BYTES, read_prior
from ..config import Settings
from ..errors import ApiError
from ..contract.jobs import JobSpec, ModelRef
from ..db.fleet import fleet_in


def _refused(field: str, exc: CheckError) -> ApiError:
    return ApiError(exc.code, f"{field}: {exc.message}", {"field": field, **exc.detail})


def complete_spec(settings: Settings, s, spec: JobSpec, uploads: dict, max_data_images: int | None = None) -> dict:
    """The spec as it is stored and run: every field resolved. `uploads`: field -> Upload row (a method
    param's file under `params.<name>`). `max_data_images`: the most target images the method takes (a
    one-shot method's `shots`)."""
    url = settings.resolved_database_url
    body = spec.model_dump(mode="json")
    if spec.models is not None:
        body = _complete_sources(settings, spec, uploads, body)
    meta = _complete_model(settings, s, spec, uploads, body) if spec.model is not None else {}
    architecture = spec.architectures()[-1][1].architecture if spec.model is None else body["model"]["architecture"]
    body["preprocess"] = resolve(spec.preprocess.model_dump(exclude_unset=True), meta.get("preprocess"), architecture)
    found = {}
    for field in ("data", "eval_data", "labelled_data", "source_data"):
        if field in uploads:
            up = uploads[field]
            try:
                with open_blob(url, up.blob_id, up.size) as f:
                    found[field] = check_dataset(f, getattr(spec, field).format, masks=spec.task == "segmentation",
                                                 labelled=field in ("eval_data", "source_data"),
                                                 box_labels=spec.task == "detection" and field == "eval_data")
            except CheckError as exc:
                raise _refused(field, exc) from None
    images = found["data"].get("images")
    if max_data_images is not None and images is not None and images > max_data_images:
        raise ApiError("invalid_spec", f"data: {spec.method} adapts on {max_data_images} target image(s) (params.shots) "
                       f"and data holds {images}; upload the one-shot image(s) as data and the rest as eval_data",
                       {"field": "data", "images": images, "shots": max_data_images})
    num_classes = body["model"]["num_classes"] if spec.model is not None else body["student"]["num_classes"]
    for field, up in uploads.items():
        if up.kind == "prior":
            _check_prior(url, field, up, num_classes, found["data"])
    return body


def _complete_sources(settings: Settings, spec: JobSpec, uploads: dict, body: dict) -> dict:
    """The sources and the student of a multi-source job: architecture, num_classes and arch_kwargs each
    leaves out are taken from its checkpoint's adaptd metadata (a student without initial weights must
    name them); then the completed spec is validated again (class counts against the student's). Their
    keys are checked by the worker."""
    for field, ref in spec.architectures():
        missing = [k for k in ("architecture", "num_classes") if getattr(ref, k) is None]
        if not missing:
            continue
        target = body["student"] if field == "student" else body["models"][int(field[len("models["):-1])]
        meta = {}
        if field in uploads:
            upload = uploads[field]
            try:
                with open_blob(settings.resolved_database_url, upload.blob_id, upload.size) as f:
                    meta = decode(inspect_checkpoint(f, upload.size, manifest.allowed_globals(), ref.format).metadata)
            except CheckError as exc:
                raise _refused(field, exc) from None
        given = ref.model_dump(exclude_unset=True)
        for key in ("architecture", "num_classes", "arch_kwargs"):
            if key not in given and key in meta:
                target[key] = meta[key]
        still = [k for k in missing if target.get(k) is None]
        if still:
            why = ("the checkpoint carries no adaptd metadata to take it from" if field in uploads
                   else "a student without initial weights names its network")
            raise ApiError("validation_error", f"{field}.{still[0]}: required ({why})",
                           {"field": f"{field}.{still[0]}", "missing": still})
    try:
        return JobSpec.model_validate(body).model_dump(mode="json")
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise ApiError("validation_error", f"with the checkpoints' adaptd metadata: {msg}",
                       {"field": "models"}) from None


def _check_prior(url: str, field: str, up, num_classes: int, data: dict) -> None:
    """A class-ratio prior file: parsed, K classes, one row or one per target image, named rows matched
    to the images (where the data's headers or directory tell the count and the names; the worker checks
    it otherwise)."""
    num_images = data.get("images")
    try:
        if up.size > MAX_PRIOR_BYTES:
            raise CheckError("invalid_prior", f"the prior file is {up.size} bytes (limit {MAX_PRIOR_BYTES})",
                             {"limit_bytes": MAX_PRIOR_BYTES})
        with open_blob(url, up.blob_id, up.size) as f:
            prior = read_prior(f.read())
        names = data.get("names") or ([str(i) for i in range(num_images)]  # an npz's images: their indices
                                      if data["format"] == "npz" and num_images is not None else None)
        prior.rows(num_classes, num_images, names if prior.images is not None else None)
    except CheckError as exc:
        raise _refused(field, exc) from None


def _complete_model(settings: Settings, s, spec: JobSpec, uploads: dict, body: dict) -> dict:
    """The single `model`: read, completed from its metadata, checked. Returns the decoded metadata.
    (The sources of a multi-source job are checked by the worker.)"""
    upload = uploads["model"]
    try:
        with open_blob(settings.resolved_database_url, upload.blob_id, upload.size) as f:
            checkpoint = inspect_checkpoint(f, upload.size, manifest.allowed_globals(), spec.model.format)
    except CheckError as exc:
        raise _refused("model", exc) from None
    meta = decode(checkpoint.metadata)
    model = body["model"]
    given = spec.model.model_dump(exclude_unset=True)
    for key in ("architecture", "num_classes", "arch_kwargs"):
        if key not in given and key in meta:
            model[key] = meta[key]
    missing = [k for k in ("architecture", "num_classes") if model.get(k) is None]
    if missing:
        raise ApiError("validation_error", f"model.{missing[0]}: required (the checkpoint carries no adaptd "
                       "metadata to take it from)", {"field": f"model.{missing[0]}", "missing": missing})
    try:
        model = ModelRef.model_validate(model).model_dump(mode="json")  # values from metadata, checked too
    except ValueError as exc:
        raise ApiError("validation_error", f"model: the checkpoint's adaptd metadata is invalid: {exc}",
                       {"field": "model"}) from None
    body["model"] = model
    library = fleet_in(s, settings).missing_library(model["architecture"])
    if library is not None:
        raise ApiError("architecture_unavailable", f"model.architecture: {model['architecture']} needs {library}, "
                       f"which no live worker has (pip install 'adaptd[{library}]' on a worker)",
                       {"field": "model.architecture", "library": library})
    if checkpoint.shapes is not None:
        try:
            manifest.check_keys(model["architecture"], model["num_classes"], model["arch_kwargs"], checkpoint.shapes)
        except CheckError as exc:
            raise _refused("model", exc) from None
    return meta
