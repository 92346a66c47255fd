from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel

UploadKind = Literal["model", "dataset"]


class UploadOut(BaseModel):
    id: str
    kind: UploadKind
    filename: str | None
    size: int
    sha256: str
    created_at: datetime
