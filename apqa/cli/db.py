"""``apqa db``: the metric store's schema (alembic migrations) and its runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from apqa.cli.app import app, fail, prose
from apqa.errors import ApqaError

DbOption = Annotated[str | None, typer.Option(
    "--db", envvar="APQA_DB", show_envvar=True,
    help="Metric store: a SQLite file, sqlite:///PATH, postgresql://USER@HOST/DB (psycopg 3) or "
         "postgresql+psycopg2://...; default ~/.local/share/apqa/metrics.db.")]

EPILOG = prose("""Examples:

  apqa db upgrade

  apqa db upgrade --db postgresql://postgres@127.0.0.1:5432/test

  apqa db runs --db metrics.db --limit 5
""")

db_app = typer.Typer(name="db", help="Metric-store schema and runs.", epilog=EPILOG,
                     no_args_is_help=True)
app.add_typer(db_app)


@db_app.command(epilog=EPILOG)
def upgrade(db: DbOption = None) -> None:
    """Create the metric store or migrate it to the current schema (alembic)."""
    from apqa.store.engine import current_revision, make_engine, resolve_url
    from apqa.store.engine import upgrade as run_upgrade

    try:
        url = resolve_url(db)
        if url.get_backend_name() == "sqlite" and url.database:
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = make_engine(url)
        try:
            current_revision(engine)
        except Exception as exc:  # the driver's connection error, as one line
            raise fail(f"--db {url.render_as_string()}: cannot connect: "
                       f"{str(exc).splitlines()[0]}") from None
        before, after = run_upgrade(engine)
        engine.dispose()
    except ApqaError as exc:
        raise fail(str(exc)) from None
    where = url.render_as_string(hide_password=True)
    if before == after:
        typer.echo(f"{where}: schema already at revision {after}")
    else:
        typer.echo(f"{where}: schema upgraded from {before or 'empty'} to revision {after}")


@db_app.command(epilog=EPILOG)
def runs(db: DbOption = None,
         dataset: Annotated[str | None, typer.Option(help="Only this dataset.")] = None,
         limit: Annotated[int, typer.Option(help="How many runs, newest first.")] = 20) -> None:
    """List the stored runs, newest first."""
    from apqa.store import MetricStore

    try:
        store = MetricStore(db, create=False)
        found = store.runs(dataset=dataset, limit=limit)
    except ApqaError as exc:
        raise fail(str(exc)) from None
    table = Table(title=f"runs in {store.display_url}")
    for column in ("id", "dataset", "status", "started (UTC)", "branch", "git sha", "config"):
        table.add_column(column)
    for r in found:
        table.add_row(str(r.id), r.dataset, r.status, r.started_at.strftime("%Y-%m-%d %H:%M:%S"),
                      r.git_branch or "", (r.git_sha or "")[:10], r.config_hash[:12])
    Console().print(table)
