"""blob_chunks.data: STORAGE EXTERNAL on PostgreSQL (no compression attempt on chunk bytes)

Uploads are mostly compressed already (checkpoints, npz, zip): pglz tried each 1 MiB chunk before
storing it as it was. Out-of-line storage stays (TOAST), without the attempt. Existing rows keep their
form; new chunks are stored uncompressed. SQLite has no such setting: nothing to do there.

Revision ID: 0006
Revises: 0005
"""
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE EXTENDED")
