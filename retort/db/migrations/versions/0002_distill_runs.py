"""The distill_runs table (``retort distill runs``).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "distill_runs",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), nullable=False, unique=True),
        sa.Column("key", sa.String(512), nullable=False),
        sa.Column("adapter", sa.String(256)),
        sa.Column("model", sa.String(256)),
        sa.Column("watermark_created", sa.Double()),
        sa.Column("watermark_count", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started", sa.Double(), nullable=False),
        sa.Column("finished", sa.Double()),
        sa.Column("out_dir", sa.Text()),
        sa.Column("student_model", sa.String(256)),
        sa.Column("gate_passed", sa.Boolean()),
        sa.Column("published", sa.Boolean()),
        sa.Column("summary", JSON),
        sa.Column("error", sa.Text()),
    )
    op.create_index("ix_distill_runs_key", "distill_runs", ["key"])


def downgrade() -> None:
    op.drop_index("ix_distill_runs_key", table_name="distill_runs")
    op.drop_table("distill_runs")
