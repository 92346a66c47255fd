"""The error body and every HTTP status code, chosen in one place (docs/ARCHITECTURE.md §1):
{"error": {"code": "snake_case_code", "message": "...", "detail": {...}}}."""
from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("adaptd.api")

STATUS = {
    "not_found": 404,
    "upload_not_found": 404,
    "job_not_found": 404,
    "job_id_too_short": 422,
    "ambiguous_job_id": 409,
    "artifact_not_found": 404,
    "validation_error": 422,
    "invalid_upload_kind": 422,
    "unknown_upload": 422,
    "unknown_method": 422,
    "invalid_params": 422,
    # Uploads refused at submit (app/services/submit_checks.py): the codes the worker would fail with.
    "unsafe_checkpoint": 422,
    "invalid_checkpoint": 422,
    "unsupported_format": 422,
    "format_mismatch": 422,
    "shape_mismatch": 422,
    "num_classes_mismatch": 422,
    "invalid_arch_kwargs": 422,
    "invalid_dataset": 422,
    "invalid_archive": 422,
    "invalid_archive_layout": 422,
    "eval_data_unlabelled": 422,
    "invalid_masks": 422,
    "invalid_mask": 422,
    "mask_size_mismatch": 422,
    "missing_mask": 422,
    "mask_without_image": 422,
    "invalid_prior": 422,
    "prior_shape_mismatch": 422,
    # Detection box labels (app/checks/boxes.py; the worker fails COCO archives with the same codes).
    "detection_labels_missing": 422,
    "invalid_detection_labels": 422,
    "invalid_box": 422,
    "box_out_of_image": 422,
    "architecture_unavailable": 422,
    "notify_url_not_allowed": 422,
    "task_mismatch": 422,
    "invalid_spec": 422,
    "payload_too_large": 413,
    "storage_quota_exceeded": 413,
    "missing_api_key": 401,
    "invalid_api_key": 401,
    "admin_required": 403,
    "concurrent_job_limit": 429,
    "job_active": 409,
    "upload_in_use": 409,
    "key_not_found": 404,
    "empty_upload": 422,
    "upload_expired": 408,
    "unsupported_media_type": 415,
    "idempotency_conflict": 409,
    "job_not_cancellable": 409,
    "range_not_satisfiable": 416,
    "method_not_allowed": 405,
    "not_ready": 503,
    "database_unavailable": 503,
    "queue_unavailable": 503,
    "internal": 500,
}


class ApiError(Exception):
    def __init__(self, code: str, message: str, detail: dict | None = None, headers: dict | None = None):
        super().__init__(message)
        self.code, self.message, self.detail, self.headers = code, message, detail or {}, headers

    @property
    def status(self) -> int:
        return STATUS[self.code]


def error_body(code: str, message: str, detail: dict | None = None, correlation_id: str | None = None) -> dict:
    """`correlation_id` ties what the client sees to the server's log line (a new one when not given)."""
    return {"error": {"code": code, "message": message, "detail": detail or {},
                      "correlation_id": correlation_id or uuid.uuid4().hex}}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError):
        return JSONResponse(error_body(exc.code, exc.message, exc.detail), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError):
        errors = [{"loc": list(e.get("loc", ())), "field": ".".join(str(p) for p in e.get("loc", ())[1:]),
                   "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        first = errors[0] if errors else {"field": "", "msg": "invalid request"}
        return JSONResponse(error_body("validation_error", f"{first['field'] or 'request'}: {first['msg']}",
                                       {"errors": errors}), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        # exc.headers: Starlette's 405 carries `Allow` (RFC 9110 requires it).
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(DataError)
    async def _unstorable_value(_req: Request, exc: DataError):
        # A request value the database refuses: a NUL character in a text value (PostgreSQL), a string
        # longer than its column. The client's input, so a 422, not a 500.
        reason = str(getattr(exc, "orig", exc)).splitlines()[0][:200]
        log.warning("unstorable request value: %s", reason)
        return JSONResponse(error_body("validation_error", f"request: a value cannot be stored: {reason}",
                                       {"reason": reason}), status_code=422)

    @app.exception_handler(PoolTimeout)
    @app.exception_handler(OperationalError)
    async def _database_down(_req: Request, exc: Exception):
        log.warning("database unavailable: %s", str(exc).splitlines()[0][:200])
        return JSONResponse(error_body("database_unavailable", "the database is unavailable; retry shortly"),
                            status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception):
        cid = uuid.uuid4().hex
        log.exception("unhandled error (correlation_id=%s)", cid)
        return JSONResponse(error_body("internal", f"internal error; the operator finds the details in the "
                                       f"server log under correlation id {cid}", correlation_id=cid),
                            status_code=500)
