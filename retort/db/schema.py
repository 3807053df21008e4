"""The prompt log's tables (SQLAlchemy Core). Alembic migrations create and upgrade them;
a change here needs a new revision in ``migrations/versions``."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

__all__ = [
    "distill_runs",
    "feedback",
    "metadata",
    "requests",
    "responses",
    "rollout_events",
    "rollouts",
    "shadow",
]

metadata = sa.MetaData()

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

requests = sa.Table(
    "requests",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("created", sa.Double(), nullable=False),
    sa.Column("key_id", sa.String(128)),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("adapter", sa.String(256)),
    sa.Column("served_by", sa.String(16), nullable=False),
    sa.Column("endpoint", sa.String(16), nullable=False),
    sa.Column("messages", _JSON),
    sa.Column("prompt", sa.Text()),
    sa.Column("params", _JSON, nullable=False),
    sa.Column("completion", sa.Text(), nullable=False),
    sa.Column("finish_reason", sa.String(32)),
    sa.Column("prompt_tokens", sa.Integer(), nullable=False),
    sa.Column("completion_tokens", sa.Integer(), nullable=False),
    sa.Column("ttft_s", sa.Double()),
    sa.Column("latency_s", sa.Double(), nullable=False),
    sa.Column("cost_usd", sa.Double(), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("error", sa.Text()),
    sa.Column("tags", _JSON, nullable=False),
    sa.Column("user", sa.String(256)),
    # Unique per record (migration 0006): inserts are idempotent (spool replay, retries).
    sa.Column("record_key", sa.String(64)),
    sa.Index("ix_requests_request_id", "request_id"),
    sa.Index("ix_requests_created", "created"),
    sa.Index("ix_requests_model", "model"),
    sa.Index("ix_requests_adapter", "adapter"),
    sa.Index("ux_requests_record_key", "record_key", unique=True),
)

feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("score", sa.Double(), nullable=False),
    sa.Column("comment", sa.Text()),
    sa.Column("created", sa.Double(), nullable=False),
    # A reviewer's corrected answer (migration 0003).
    sa.Column("correction", sa.Text()),
    sa.Index("ix_feedback_request_id", "request_id"),
)

# One row per `retort distill run`: its key (model/adapter and filters), the watermark of
# the log it saw (latest `created` and row count), its status and outcome.
distill_runs = sa.Table(
    "distill_runs",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
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
    sa.Column("summary", _JSON),
    sa.Column("error", sa.Text()),
    sa.Index("ix_distill_runs_key", "key"),
)

# One row per shadow comparison (gateway/shadow.py): a teacher's live answer and its
# candidate student's answer to the same request, compared by the task's measure.
shadow = sa.Table(
    "shadow",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
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
    sa.Index("ix_shadow_request_id", "request_id"),
    sa.Index("ix_shadow_pair_created", "teacher", "student", "created"),
)

# Stored Responses API objects (``store: true``): the response as returned, and the
# context that produced it (chat messages, instructions excluded) so that a request with
# ``previous_response_id`` continues it on any replica. Purged with the log's retention.
responses = sa.Table(
    "responses",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("created", sa.Double(), nullable=False),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("key_id", sa.String(128)),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("previous_response_id", sa.String(64)),
    sa.Column("context", _JSON, nullable=False),
    sa.Column("response", _JSON, nullable=False),
    sa.Index("ix_responses_created", "created"),
)

# Staged rollouts of students (gateway/rollout, retort/rollout.py; migration 0007): one row
# per rollout, its stage and status; every replica reads the same split from here.
rollouts = sa.Table(
    "rollouts",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("teacher", sa.String(256), nullable=False),
    sa.Column("student", sa.String(256), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("step", sa.Integer(), nullable=False),
    sa.Column("plan", _JSON, nullable=False),
    sa.Column("created", sa.Double(), nullable=False),
    sa.Column("updated", sa.Double(), nullable=False),
    sa.Column("stage_since", sa.Double(), nullable=False),
    sa.Column("version", sa.Integer(), nullable=False),
    sa.Column("last_rule", sa.String(64)),
    sa.Column("reason", sa.Text()),
    sa.Index("ix_rollouts_teacher", "teacher"),
)

# Every rollout decision (start, advance, hold, rollback, pause, resume), its reason and
# the figures it was taken on.
rollout_events = sa.Table(
    "rollout_events",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("rollout_id", _ID, nullable=False),
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
    sa.Column("figures", _JSON, nullable=False),
    sa.Index("ix_rollout_events_rollout", "rollout_id", "id"),
)
