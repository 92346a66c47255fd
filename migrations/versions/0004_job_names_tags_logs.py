"""jobs.name, job_tags (find runs again: GET /v1/jobs?name=&tag=) and job_logs (a job's own log lines)

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("name", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("tags", sa.JSON(), nullable=False, server_default="[]"))
        batch_op.create_index(batch_op.f("ix_jobs_name"), ["name"], unique=False)
    op.create_table(
        "job_tags",
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("tag", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "tag"),
    )
    op.create_index(op.f("ix_job_tags_tag"), "job_tags", ["tag"], unique=False)
    op.create_table(
        "job_logs",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True,
                  nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("seq"),
    )
    op.create_index("ix_job_logs_job_id_seq", "job_logs", ["job_id", "seq"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_job_logs_job_id_seq", table_name="job_logs")
    op.drop_table("job_logs")
    op.drop_index(op.f("ix_job_tags_tag"), table_name="job_tags")
    op.drop_table("job_tags")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_name"))
        batch_op.drop_column("tags")
        batch_op.drop_column("name")
