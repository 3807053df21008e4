"""feedback.correction: a reviewer's corrected answer (the console's rating form, /v1/feedback).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("feedback") as batch:
        batch.add_column(sa.Column("correction", sa.Text()))


def downgrade() -> None:
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("correction")
