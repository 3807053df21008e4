"""The requests and feedback tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "requests",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("created", sa.Double(), nullable=False),
        sa.Column("key_id", sa.String(128)),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("adapter", sa.String(256)),
        sa.Column("served_by", sa.String(16), nullable=False),
        sa.Column("endpoint", sa.String(16), nullable=False),
        sa.Column("messages", JSON),
        sa.Column("prompt", sa.Text()),
        sa.Column("params", JSON, nullable=False),
        sa.Column("completion", sa.Text(), nullable=False),
        sa.Column("finish_reason", sa.String(32)),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("ttft_s", sa.Double()),
        sa.Column("latency_s", sa.Double(), nullable=False),
        sa.Column("cost_usd", sa.Double(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("tags", JSON, nullable=False),
        sa.Column("user", sa.String(256)),
    )
    op.create_index("ix_requests_request_id", "requests", ["request_id"])
    op.create_index("ix_requests_created", "requests", ["created"])
    op.create_index("ix_requests_model", "requests", ["model"])
    op.create_index("ix_requests_adapter", "requests", ["adapter"])
    op.create_table(
        "feedback",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("score", sa.Double(), nullable=False),
        sa.Column("comment", sa.Text()),
        sa.Column("created", sa.Double(), nullable=False),
    )
    op.create_index("ix_feedback_request_id", "feedback", ["request_id"])


def downgrade() -> None:
    op.drop_index("ix_feedback_request_id", table_name="feedback")
    op.drop_table("feedback")
    for name in ("adapter", "model", "created", "request_id"):
        op.drop_index(f"ix_requests_{name}", table_name="requests")
    op.drop_table("requests")
