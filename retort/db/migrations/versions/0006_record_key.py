"""requests.record_key: one unique key per log record, so that writing a record twice (the
disk spool replayed after a crash, a batch retried after its commit was lost) keeps one row.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Nullable: rows written before this revision have no key (NULLs never conflict).
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("record_key", sa.String(64)))
    op.create_index("ux_requests_record_key", "requests", ["record_key"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_requests_record_key", table_name="requests")
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("record_key")
