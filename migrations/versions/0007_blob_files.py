"""blobs.in_file: a blob's bytes are one file in ADAPTD_BLOB_DIR instead of blob_chunks rows

Existing blobs keep their chunk rows (false); readers pick the store by this column, so a database
holds both kinds once ADAPTD_BLOB_DIR is set.

Revision ID: 0007
Revises: 0006
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("blobs", sa.Column("in_file", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("blobs") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("in_file")
