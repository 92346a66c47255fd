from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from ..errors import ApiError
from ..contract.uploads import UploadKind, UploadOut
from ..services import uploads as service
from .deps import PrincipalDep, SettingsDep

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])

RAW_BODY = {"requestBody": {"required": True, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
}}}


def _upload_out(u) -> UploadOut:
    return UploadOut(id=u.id, kind=u.kind, filename=u.filename, size=u.size, sha256=u.sha256,
                     created_at=u.created_at)


@router.post("", status_code=201, response_model=UploadOut, openapi_extra=RAW_BODY)
async def create_upload(request: Request, settings: SettingsDep, who: PrincipalDep, kind: UploadKind = Query(...),
                        filename: str | None = Query(None, max_length=255)) -> UploadOut:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        # Starlette spools file parts to disk past 1 MiB, so memory stays bounded.
        form = await request.form(max_files=1, max_fields=10)
        part = form.get("file")
        if part is None or isinstance(part, str):
            raise ApiError("validation_error", "file: multipart upload needs one 'file' part", {"field": "file"})

        async def chunks():
            while data := await part.read(settings.chunk_bytes):
                yield data

        upload = await service.store_stream(settings, who.tenant_id, kind, filename or part.filename, chunks())
        await form.close()
    else:
        length = request.headers.get("content-length")
        upload = await service.store_stream(settings, who.tenant_id, kind, filename, request.stream(),
                                            int(length) if length and length.isdigit() else None)
    return _upload_out(upload)


@router.get("/{upload_id}", response_model=UploadOut)
async def get_upload(upload_id: str, settings: SettingsDep, who: PrincipalDep) -> UploadOut:
    return _upload_out(await run_in_threadpool(service.get_upload, settings, who.tenant_id, upload_id))


@router.delete("/{upload_id}", status_code=204)
async def delete_upload(upload_id: str, settings: SettingsDep, who: PrincipalDep) -> Response:
    await run_in_threadpool(service.delete_upload, settings, who.tenant_id, upload_id)
    return Response(status_code=204)
