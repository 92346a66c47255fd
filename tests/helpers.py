"""Small helpers shared by the HTTP tests."""
from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import numpy as np
from sqlalchemy import text

from app.config import Settings
from app.db.models import Job, utcnow
from app.db.session import session_scope
from app.storage.files import path_in


def tent_spec(uploads: dict, assets: dict, method: str = "tent", params: dict | None = None,
              options: dict | None = None) -> dict:
    spec = copy.deepcopy({
        "method": method, "params": params or {},
        "model": {"upload_id": uploads["model"]["id"], "architecture": "digit_cnn", "num_classes": 10,
                  "arch_kwargs": assets["arch_kwargs"]},
        "data": {"upload_id": uploads["target"]["id"]},
        "preprocess": assets["preprocess"],
        "options": {"batch_size": 64, "seed": 0, **(options or {})},
    })
    if "eval" in uploads:
        spec["eval_data"] = {"upload_id": uploads["eval"]["id"]}
    return spec


def upload_assets(client, assets: dict, with_eval: bool = True) -> dict:
    out = {"model": client.upload(assets["model"], "model"), "target": client.upload(assets["target"], "dataset")}
    if with_eval:
        out["eval"] = client.upload(assets["eval"], "dataset")
    return out


def eval_accuracy(weights_path, assets: dict) -> float:
    """Load downloaded weights into the architecture and score them in eval() mode."""
    import torch
    from safetensors.torch import load_file

    from worker.adaptation.data import Preprocess
    from worker.adaptation.models import build_model

    model = build_model("digit_cnn", 10, **assets["arch_kwargs"])
    model.load_state_dict(load_file(str(weights_path)))
    model.eval()
    with torch.no_grad():
        x = Preprocess(**assets["preprocess"])(torch.from_numpy(assets["x"][..., None]), torch.device("cpu"))
        return float((model(x).argmax(1).numpy() == assets["y"]).mean())


def random_npz(path, n: int, size: int = 16, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.integers(0, 256, size=(n, size, size), dtype=np.uint8))


def db_url(service) -> str:
    return service.env.get("ADAPTD_DATABASE_URL") or f"sqlite:///{service.env['ADAPTD_HOME']}/adaptd.db"


def blob_dir(service) -> Path | None:
    """The service's blob folder (None: chunk rows), as its settings resolve it."""
    env = service.env
    return Settings(home=env["ADAPTD_HOME"], database_url=env.get("ADAPTD_DATABASE_URL"),
                    blob_dir=env.get("ADAPTD_BLOB_DIR")).resolved_blob_dir


def blob_files(service) -> list[Path]:
    """The content files in the service's blob folder, temporary ones (tmp/) included."""
    folder = blob_dir(service)
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder else []


def blob_path(service, job_id: str, artifact: str) -> Path | None:
    """The file holding an artifact's bytes; None when they are chunk rows."""
    with session_scope(db_url(service)) as s:
        blob_id, in_file = s.execute(text("select b.id, b.in_file from artifacts a join blobs b on b.id = a.blob_id "
                                          "where a.job_id = :j and a.name = :n"), {"j": job_id, "n": artifact}).one()
    return path_in(blob_dir(service), blob_id) if in_file else None


def add_jobs(service, ids_by_tenant: dict[str, list[str]]) -> None:
    """Finished job rows with chosen ids (uuid4s cannot be made to share a prefix on demand)."""
    with session_scope(db_url(service)) as s:
        for tenant, ids in ids_by_tenant.items():
            for job_id in ids:
                s.add(Job(id=job_id, tenant_id=tenant, status="cancelled", method="tent", params={},
                          spec={"method": "tent"}, finished_at=utcnow()))


# --- checkpoints written without torch (tests/test_lowest.py runs where torch is absent) ------------

def write_safetensors(path, shapes: dict[str, list[int]]) -> None:
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def digit_cnn_shapes(**params) -> dict[str, list[int]]:
    from app.checks import manifest

    entry = manifest.load()["architectures"]["digit_cnn"]
    return manifest.shapes_at(entry, {**entry["base"], **params})
