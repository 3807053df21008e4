"""The responses table (stored Responses API objects).

Revision ID: 0004
Revises: 0003 (0003, feedback correction, is on the console branch: chain it before this one)
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "responses",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("created", sa.Double(), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("key_id", sa.String(128)),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("previous_response_id", sa.String(64)),
        sa.Column("context", JSON, nullable=False),
        sa.Column("response", JSON, nullable=False),
    )
    op.create_index("ix_responses_created", "responses", ["created"])


def downgrade() -> None:
    op.drop_index("ix_responses_created", table_name="responses")
    op.drop_table("responses")
