"""The rollouts and rollout_events tables (staged rollouts of students).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("teacher", sa.String(256), nullable=False),
        sa.Column("student", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("plan", JSON, nullable=False),
        sa.Column("created", sa.Double(), nullable=False),
        sa.Column("updated", sa.Double(), nullable=False),
        sa.Column("stage_since", sa.Double(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("last_rule", sa.String(64)),
        sa.Column("reason", sa.Text()),
    )
    op.create_index("ix_rollouts_teacher", "rollouts", ["teacher"])
    op.create_table(
        "rollout_events",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("rollout_id", ID, nullable=False),
        sa.Column("created", sa.Double(), nullable=False),
        sa.Column("teacher", sa.String(256), nullable=False),
        sa.Column("student", sa.String(256), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(16), nullable=False),
        sa.Column("from_stage", sa.String(16), nullable=False),
        sa.Column("to_stage", sa.String(16), nullable=False),
        sa.Column("share", sa.Double(), nullable=False),
        sa.Column("rule", sa.String(64)),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("figures", JSON, nullable=False),
    )
    op.create_index("ix_rollout_events_rollout", "rollout_events", ["rollout_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_rollout_events_rollout", table_name="rollout_events")
    op.drop_table("rollout_events")
    op.drop_index("ix_rollouts_teacher", table_name="rollouts")
    op.drop_table("rollouts")
