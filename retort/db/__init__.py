"""The database (SQLite or Postgres) every component shares.

- :mod:`retort.db.schema` — every table (SQLAlchemy Core): ``requests``, ``feedback``,
  ``distill_runs``. A change there needs a new revision in ``migrations/versions``.
- :mod:`retort.db.migrate` — runs the Alembic migrations (``upgrade``).
- :mod:`retort.db.store` — :class:`~retort.db.store.PromptStore`, the async store.
- :mod:`retort.db.record` — :class:`~retort.db.record.LogRecord`, one logged request.
- :mod:`retort.db.export` — ``retort logs export`` and the row format distill reads.
"""
