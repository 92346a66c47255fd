"""Run the Alembic migrations programmatically (embedded mode, tests). Production runs
`alembic upgrade head` (config in pyproject.toml) as a one-shot container."""
from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations


def upgrade_head(database_url: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.attributes["database_url"] = database_url
    command.upgrade(cfg, "head")
