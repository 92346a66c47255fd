from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel

UploadKind = Literal["model", "dataset", "prior"]  # prior: a method param file (sfda_prior's prior_upload)


class UploadOut(BaseModel):
    id: str
    kind: UploadKind
    filename: str | None
    size: int
    sha256: str
    created_at: datetime
