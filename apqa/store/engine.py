"""Database URLs, engines and the alembic migrations shipped inside the package."""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from apqa.errors import InputError

DEFAULT_DB = Path("~/.local/share/apqa/metrics.db")
ENV_VAR = "APQA_DB"
MIGRATIONS = Path(__file__).parent / "migrations"
_DRIVERS = {"sqlite", "sqlite+pysqlite", "postgresql", "postgresql+psycopg",
            "postgresql+psycopg2"}


def resolve_url(db: str | os.PathLike | None = None) -> URL:
    """The database URL for ``db``: a URL, a SQLite file path, or (None) ``$APQA_DB`` or
    ``~/.local/share/apqa/metrics.db``.

    ``postgresql://`` uses psycopg 3, ``postgresql+psycopg2://`` psycopg2.

    Examples
    --------
    >>> resolve_url("/tmp/m.db").render_as_string()
    'sqlite:////tmp/m.db'
    >>> resolve_url("postgresql://postgres@127.0.0.1/test").drivername
    'postgresql+psycopg'
    """
    text = str(db) if db is not None else os.environ.get(ENV_VAR) or str(DEFAULT_DB)
    if "://" not in text:
        return URL.create("sqlite", database=str(Path(text).expanduser().resolve()))
    if text.startswith("postgres://"):
        text = "postgresql://" + text[len("postgres://"):]
    try:
        url = make_url(text)
    except ArgumentError:
        raise InputError(f"--db: {text!r} is not a database URL") from None
    if url.drivername not in _DRIVERS:
        raise InputError(f"--db: driver {url.drivername!r} is not supported; expected sqlite, "
                         "postgresql (psycopg 3) or postgresql+psycopg2")
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return url


def make_engine(url: URL) -> Engine:
    """An engine; SQLite gets foreign keys, WAL and a busy timeout for concurrent writers."""
    try:
        if url.get_backend_name() == "sqlite":
            engine = create_engine(url, connect_args={"timeout": 30})
            event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        return create_engine(url, pool_pre_ping=True)
    except NoSuchModuleError as exc:
        raise InputError(f"--db: {exc}") from None


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    """The newest migration shipped with this apqa."""
    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The database's migration revision (None for an empty database)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Run the migrations up to ``revision`` in one transaction; returns (before, after)."""
    before = current_revision(engine)
    config = _alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
    return before, current_revision(engine)
