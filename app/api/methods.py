from __future__ import annotations

from fastapi import APIRouter

from ..contract.catalog import catalogue_json

router = APIRouter(prefix="/v1/methods", tags=["methods"])


@router.get("")
async def list_methods() -> dict:
    return {"methods": catalogue_json()}
