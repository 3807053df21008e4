"""Alembic migrations of the prompt log (run by :func:`gateway.promptlog.migrate.upgrade`)."""
