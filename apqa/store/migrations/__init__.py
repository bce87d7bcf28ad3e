"""Alembic migrations of the metric store, run programmatically by ``apqa db upgrade``."""
