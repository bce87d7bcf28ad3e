"""``apqa apdb create`` and ``apqa apdb show`` on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import uuid

import numpy as np
import psycopg
import pytest
from typer.testing import CliRunner

from apqa.cli.app import register_commands
from apqa.datamodel.apdb_schema import empty_table, load_apdb_schema
from apqa.pipeline.apdb import Apdb

runner = CliRunner()
app = register_commands()
PG = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def pg_apdb_url():
    """URL of a fresh schema on the real PostgreSQL server (dropped after the test)."""
    schema = f"apqa_apdbcli_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield f"{PG}?options=-csearch_path%3D{schema}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def _one_source(url: str) -> None:
    src = empty_table("DiaSource", 1)
    src["diaSourceId"], src["visit"], src["detector"] = 123, 1, 1
    src["ra"], src["dec"], src["midpointMjdTai"] = 10.0, -5.0, 60000.0
    obj = empty_table("DiaObject", 1)
    obj["diaObjectId"], obj["ra"], obj["dec"], obj["nDiaSources"] = 123, 10.0, -5.0, 1
    with Apdb.open(url) as apdb:
        apdb.store_visit(1, 1, src, obj)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_create_then_show(backend, tmp_path, request):
    url = (str(tmp_path / "apdb.sqlite3") if backend == "sqlite"
           else request.getfixturevalue("pg_apdb_url"))
    version = load_apdb_schema().version
    result = runner.invoke(app, ["apdb", "create", "--db", url])
    assert result.exit_code == 0, result.output
    assert f"APDB ready, schema version {version}" in result.stdout
    again = runner.invoke(app, ["apdb", "create", "--db", url])  # idempotent
    assert again.exit_code == 0, again.output
    _one_source(url)
    shown = runner.invoke(app, ["apdb", "show", "--db", url])
    assert shown.exit_code == 0, shown.output
    assert f"version:schema: {version}" in shown.stdout
    assert "apqa:pixelization: healpix-nested-order16" in shown.stdout
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in shown.stdout.splitlines() if line.count("│") == 3}
    assert rows["DiaSource"] == "1" and rows["DiaObject"] == "1"
    assert rows["DiaForcedSource"] == "0" and rows["SSObject"] == "0"
    assert np.isin(["metadata", "DiaObjectLast", "DiaObject (current)"], list(rows)).all()


def test_errors_are_one_line_and_exit_2(tmp_path):
    missing = runner.invoke(app, ["apdb", "show", "--db", str(tmp_path / "none.db")])
    assert missing.exit_code == 2
    assert missing.output.strip().count("\n") == 0
    assert "no such file; create it with `apqa apdb create" in missing.output
    refused = runner.invoke(app, ["apdb", "create", "--db",
                                  "postgresql://postgres@127.0.0.1:1/test"])
    assert refused.exit_code == 2
    assert "database unreachable or refused the connection" in refused.output
    assert "Connection refused" in refused.output
    bad = runner.invoke(app, ["apdb", "show", "--db", "oracle://x/y"])
    assert bad.exit_code == 2 and "driver 'oracle' is not supported" in bad.output


def test_help_has_examples():
    for args in (["apdb", "--help"], ["apdb", "create", "--help"], ["apdb", "show", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0
        assert "Examples" in result.stdout and "apqa apdb create --db" in result.stdout
