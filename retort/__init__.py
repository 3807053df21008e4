"""Retort's shared library: what the gateway and the libraries (adapters, distill) both use.

- :mod:`retort.settings` — settings loading (YAML + ``RETORT_*``), the state folder, the
  shared sections (:class:`~retort.settings.SharedSettings`).
- :mod:`retort.models` — provisioning the default model.
- :mod:`retort.db` — the database: schema, Alembic migrations, the prompt-log store, export.

It imports nothing from ``gateway``, ``adapters``, ``distill`` or ``loadtest``.
"""
