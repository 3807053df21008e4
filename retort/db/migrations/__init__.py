"""Alembic migrations of the prompt log (run by :func:`retort.db.migrate.upgrade`)."""
