from __future__ import annotations

from fastapi import APIRouter

from worker.adaptation.catalog import CATALOG

router = APIRouter(prefix="/v1/methods", tags=["methods"])


@router.get("")
async def list_methods() -> dict:
    return {"methods": [
        {"name": m.name, "kind": m.kind, "description": m.description, "needs_labels": m.needs_labels,
         "needs_source_statistics": m.needs_source_statistics, "updates_weights": m.updates_weights,
         "cost": m.cost(), "params_schema": m.params_schema()}
        for m in CATALOG.values()
    ]}
