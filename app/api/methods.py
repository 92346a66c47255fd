from __future__ import annotations

from fastapi import APIRouter

from ..contract.catalog import CATALOG

router = APIRouter(prefix="/v1/methods", tags=["methods"])


@router.get("")
async def list_methods() -> dict:
    return {"methods": [
        # needs_labels / needs_source_statistics: kept in the response for existing clients; the service
        # never has labels or source data, so no method can need them.
        {"name": m.name, "kind": m.kind, "description": m.description, "needs_labels": False,
         "needs_source_statistics": False, "updates_weights": m.updates_weights, "tasks": list(m.tasks),
         "params_schema": m.params_schema()}
        for m in CATALOG.values()
    ]}
