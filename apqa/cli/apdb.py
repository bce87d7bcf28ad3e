"""``apqa apdb``: create an Alert Production Database and show what it holds."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from apqa.cli.app import app, fail, prose
from apqa.errors import ApqaError

EPILOG = prose("""Examples:

  apqa apdb create --db run/apdb.sqlite3

  apqa apdb create --db postgresql://postgres@127.0.0.1/test

  apqa apdb show --db postgresql://postgres@127.0.0.1/test?options=-csearch_path%3Dmy_schema

--db is a SQLite file path (or sqlite:///PATH) or a PostgreSQL URL: postgresql:// uses \
psycopg 3, postgresql+psycopg2:// psycopg2.

Tables come from the apdb.yaml of the installed lsst-sdm-schemas; on PostgreSQL they go \
into the connection's search_path schema.
""")

apdb_app = typer.Typer(help="Alert Production Database (APDB): create, show.", epilog=EPILOG,
                       no_args_is_help=True)
app.add_typer(apdb_app, name="apdb")

DbOption = Annotated[str, typer.Option("--db", help="SQLite file or database URL.")]


@apdb_app.command(epilog=EPILOG)
def create(db: DbOption) -> None:
    """Create the APDB tables (Rubin's apdb.yaml) and record the schema version."""
    from apqa.pipeline.apdb import Apdb

    try:
        with Apdb.create(db) as apdb:
            version = apdb.schema_version
            url = apdb.url
    except ApqaError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"{url}: APDB ready, schema version {version}")


@apdb_app.command(epilog=EPILOG)
def show(db: DbOption) -> None:
    """Print the schema version, the pixelization and the rows of every table."""
    from apqa.pipeline.apdb import Apdb

    try:
        with Apdb.open(db) as apdb:
            meta = apdb.metadata()
            counts = apdb.counts()
            url = apdb.url
    except ApqaError as exc:
        raise fail(str(exc)) from None
    console = Console(highlight=False)
    console.print(f"{url}", markup=False)
    for key, value in sorted(meta.items()):
        console.print(f"  {key}: {value}", markup=False)
    table = Table("table", "rows")
    for name, count in counts.items():
        table.add_row(name, str(count))
    console.print(table)
