"""The alembic migrations shipped in the package: they build the models' schema."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from typer.testing import CliRunner

from apqa.cli.app import register_commands
from apqa.errors import InputError
from apqa.store import MetricStore
from apqa.store.engine import current_revision, head_revision, make_engine, resolve_url, upgrade
from apqa.store.models import Base

from .conftest import pg_url

runner = CliRunner()
app = register_commands()


def test_migrations_match_the_models(db_url):
    engine = make_engine(resolve_url(db_url))
    assert upgrade(engine) == (None, head_revision())
    assert upgrade(engine) == (head_revision(), head_revision())  # idempotent
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    assert set(inspect(engine).get_table_names()) == {"alembic_version", "runs", "measurements"}
    engine.dispose()


def test_database_at_another_revision_asks_for_upgrade(db_url):
    engine = make_engine(resolve_url(db_url))
    upgrade(engine)
    with engine.begin() as conn:  # as if written by an older apqa
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0000'")
    assert current_revision(engine) == "0000"
    with pytest.raises(InputError, match=r"schema revision 0000 is not the current 0001; run "
                                         r"`apqa db upgrade --db URL`"):
        MetricStore(db_url)
    engine.dispose()


def test_db_upgrade_command(tmp_path):
    db = tmp_path / "deep" / "metrics.db"
    result = runner.invoke(app, ["db", "upgrade", "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert f"sqlite:///{db}: schema upgraded from empty to revision 0001" in result.stdout
    result = runner.invoke(app, ["db", "upgrade"], env={"APQA_DB": str(db)})
    assert "schema already at revision 0001" in result.stdout
    assert MetricStore(db, create=False).runs() == []
    result = runner.invoke(app, ["db", "upgrade", "--db", "postgresql://postgres@127.0.0.1:1/x"])
    assert result.exit_code == 2 and "cannot connect" in result.output


def test_empty_postgres_schema_is_not_created_by_readers(pg_schema):
    with pytest.raises(InputError, match=r"no apqa metric schema; run `apqa db upgrade"):
        MetricStore(pg_url(pg_schema), create=False)
    assert MetricStore(pg_url(pg_schema)).runs() == []  # writers create it
