"""APDB database plumbing: URLs, engines, and SQLAlchemy tables built from ``apdb.yaml``.

Tables, columns, primary keys and indexes come from the installed lsst-sdm-schemas ``apdb.yaml``
(through :mod:`apqa.datamodel.apdb_schema`); apqa adds only the ``pixelId`` column (HEALPix, see
:mod:`apqa.pipeline.apdb_region`) and its index to DiaObject and DiaSource, as Rubin's own APDB
code adds its spatial index column.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from apqa.datamodel.apdb_schema import ApdbColumn, load_apdb_schema
from apqa.errors import ApqaError, InputError

#: Tables that carry the HEALPix ``pixelId`` column.
PIXEL_TABLES = ("DiaObject", "DiaSource")
PIXEL_COLUMN = "pixelId"
#: Metadata keys (Rubin's APDB uses the same ``version:schema`` key for the apdb.yaml version).
KEY_SCHEMA_VERSION = "version:schema"
KEY_PIXELIZATION = "apqa:pixelization"

_DRIVERS = {"sqlite": "sqlite", "sqlite+pysqlite": "sqlite",
            "postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg",
            "postgresql+psycopg": "postgresql+psycopg",
            "postgresql+psycopg2": "postgresql+psycopg2"}


class ApdbError(ApqaError):
    """The APDB cannot be reached, is not an APDB, or does not match this apqa's schema."""


def resolve_url(db: str | Path) -> URL:
    """The SQLAlchemy URL of an APDB given as a URL or a SQLite file path.

    ``postgresql://`` (and ``postgres://``) use psycopg 3, ``postgresql+psycopg2://`` psycopg2.

    Examples
    --------
    >>> resolve_url("postgresql://postgres@127.0.0.1/test").drivername
    'postgresql+psycopg'
    >>> resolve_url("/tmp/run/apdb.sqlite3").render_as_string()
    'sqlite:////tmp/run/apdb.sqlite3'
    """
    text = str(db)
    if "://" not in text:
        return URL.create("sqlite", database=str(Path(text).expanduser().resolve()))
    try:
        url = make_url(text)
    except ArgumentError:
        raise InputError(f"APDB {text!r}: not a database URL or file path") from None
    if url.drivername not in _DRIVERS:
        raise InputError(f"APDB {text!r}: driver {url.drivername!r} is not supported; expected "
                         "a SQLite file, sqlite:///PATH, postgresql:// (psycopg 3) or "
                         "postgresql+psycopg2://")
    return url.set(drivername=_DRIVERS[url.drivername])


def display_url(url: URL) -> str:
    """The URL as shown in messages, password hidden."""
    return url.render_as_string(hide_password=True)


def make_engine(url: URL) -> Engine:
    """An engine for ``url``; SQLite gets WAL journaling and a busy timeout."""
    try:
        if url.get_backend_name() == "sqlite":
            engine = sa.create_engine(url, connect_args={"timeout": 30})
            sa.event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        return sa.create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 10})
    except NoSuchModuleError as exc:
        raise InputError(f"APDB {display_url(url)}: {exc}") from None


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: readers do not block the writer; a killed writer's transaction is rolled back on open.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sql_type(col: ApdbColumn) -> sa.types.TypeEngine:
    """Felis datatype -> SQLAlchemy type (the mapping lsst-felis uses)."""
    kind = col.datatype
    if kind == "long":
        return sa.BigInteger()
    if kind == "int":
        return sa.Integer()
    if kind in ("short", "byte"):
        return sa.SmallInteger()
    if kind == "double":
        return sa.Double()
    if kind == "float":
        return sa.REAL()
    if kind == "boolean":
        return sa.Boolean()
    if kind == "char":
        return sa.CHAR(col.length or 1)
    if kind == "string":
        return sa.String(col.length)
    if kind == "text":
        return sa.Text()
    if kind == "timestamp":
        return sa.DateTime()
    raise ApdbError(f"apdb.yaml: column {col.name!r} has unknown datatype {kind!r}")


def build_metadata() -> sa.MetaData:
    """SQLAlchemy tables for every table of ``apdb.yaml`` (plus ``pixelId`` where indexed)."""
    schema = load_apdb_schema()
    metadata = sa.MetaData()
    for table in schema.tables.values():
        items: list = [sa.Column(c.name, _sql_type(c), nullable=c.nullable)
                       for c in table.columns]
        if table.name in PIXEL_TABLES:
            items.append(sa.Column(PIXEL_COLUMN, sa.BigInteger(), nullable=False))
            items.append(sa.Index(f"IDX_{table.name}_{PIXEL_COLUMN}", PIXEL_COLUMN))
        if table.primary_key:
            items.append(sa.PrimaryKeyConstraint(*table.primary_key))
        items.extend(sa.Index(name, *cols) for name, cols in table.indexes)
        sa.Table(table.name, metadata, *items)
    return metadata
