"""Alembic environment: the database URL comes from adaptd's settings (ADAPTD_DATABASE_URL, or the
embedded SQLite file), unless a programmatic caller sets `config.attributes["database_url"]`."""
from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from app.config import get_settings
from app.db.models import Base

config = context.config
url = config.attributes.get("database_url") or get_settings().resolved_database_url
if url.startswith("sqlite:///"):
    from pathlib import Path
    Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = engine_from_config({"sqlalchemy.url": url}, prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.connect() as connection:
        if connection.dialect.name == "sqlite":  # a new file's page size, before its first table
            from app.db.session import set_sqlite_page_size

            set_sqlite_page_size(connection.connection.dbapi_connection)
        context.configure(connection=connection, target_metadata=Base.metadata,
                          render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
