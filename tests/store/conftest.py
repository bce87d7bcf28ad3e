"""Metric-store fixtures: a fresh SQLite file, or a fresh PostgreSQL schema, per test."""

from __future__ import annotations

import uuid

import psycopg
import pytest

PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


@pytest.fixture
def pg_schema():
    """A new schema on the real PostgreSQL server, dropped after the test."""
    schema = f"apqa_store_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield schema
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def pg_url(schema: str, driver: str = "") -> str:
    return (f"postgresql{driver}://postgres@127.0.0.1:5432/test"
            f"?options=-csearch_path%3D{schema}")


@pytest.fixture(params=["sqlite", "postgresql", "postgresql+psycopg2"])
def db_url(request, tmp_path):
    """A URL of an empty metric database on each supported backend and driver."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'metrics.db'}"
        return
    schema = request.getfixturevalue("pg_schema")
    yield pg_url(schema, request.param[len("postgresql"):])
