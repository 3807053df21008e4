"""The shadow table (shadow evaluation of candidate students on live traffic).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "shadow",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("created", sa.Double(), nullable=False),
        sa.Column("teacher", sa.String(256), nullable=False),
        sa.Column("student", sa.String(256), nullable=False),
        sa.Column("measure", sa.String(16), nullable=False),
        sa.Column("score", sa.Double()),
        sa.Column("agree", sa.Boolean()),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("teacher_text", sa.Text(), nullable=False),
        sa.Column("student_text", sa.Text(), nullable=False),
        sa.Column("teacher_latency_s", sa.Double(), nullable=False),
        sa.Column("student_latency_s", sa.Double()),
        sa.Column("teacher_cost_usd", sa.Double(), nullable=False),
        sa.Column("student_cost_usd", sa.Double()),
        sa.Column("student_tokens", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text()),
    )
    op.create_index("ix_shadow_request_id", "shadow", ["request_id"])
    op.create_index("ix_shadow_pair_created", "shadow", ["teacher", "student", "created"])


def downgrade() -> None:
    op.drop_index("ix_shadow_pair_created", table_name="shadow")
    op.drop_index("ix_shadow_request_id", table_name="shadow")
    op.drop_table("shadow")
