"""``apqa export``: stored runs to InfluxDB v2 or to lsst.verify Job JSON files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress

from apqa.cli.app import app, fail
from apqa.cli.db import DbOption
from apqa.errors import ApqaError

EPILOG = "\n\n".join([
    "Examples:",
    "  apqa export influx --url http://localhost:8086 --org rubin --bucket apqa --run latest",
    "  INFLUX_TOKEN=... apqa export influx --url https://influx.example.org --org rubin "
    "--bucket apqa --all --db postgresql://postgres@127.0.0.1/test",
    "  apqa export verify --run latest --out verify-jobs/",
    "InfluxDB: one point per measurement, measurement name = metric, tags = the measurement's "
    "tags plus run_id, dataset, git_branch, git_sha; fields value, uncertainty and unit; time = "
    "the run's start. Needs the InfluxDB v2 write API (/api/v2/write: InfluxDB 2.x, or "
    "VictoriaMetrics, which apqa's tests use); InfluxDB 1.x has no such API.",
])

export_app = typer.Typer(name="export", help="Export stored runs.", epilog=EPILOG,
                         no_args_is_help=True)
app.add_typer(export_app)

RunsOption = Annotated[list[str] | None, typer.Option(
    "--run", help="Run id or 'latest' (repeatable; default latest).")]


@export_app.command(epilog=EPILOG)
def influx(
    url: Annotated[str, typer.Option(help="InfluxDB base URL, e.g. http://localhost:8086.")],
    org: Annotated[str, typer.Option(help="InfluxDB organization.")],
    bucket: Annotated[str, typer.Option(help="InfluxDB bucket.")],
    token: Annotated[str, typer.Option(envvar="INFLUX_TOKEN", show_envvar=True,
                                       help="API token.")] = "",
    db: DbOption = None,
    run: RunsOption = None,
    all_runs: Annotated[bool, typer.Option("--all", help="Every succeeded run.")] = False,
    batch_size: Annotated[int, typer.Option(help="Points per write request.")] = 5000,
    retries: Annotated[int, typer.Option(help="Retries of a failed request.")] = 5,
) -> None:
    """Write runs' measurements to an InfluxDB v2 bucket (line protocol, batched, retried)."""
    from apqa.store import MetricStore
    from apqa.store.influx import export_influx

    try:
        store = MetricStore(db, create=False)
        runs = (store.runs(status="succeeded", limit=None) if all_runs
                else [store.resolve_run(r) for r in (run or ["latest"])])
        with Progress(console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task("exporting runs", total=len(runs))
            written = export_influx(store, runs, url=url, org=org, bucket=bucket, token=token,
                                    batch_size=batch_size, retries=retries,
                                    on_run=lambda run, n: progress.advance(task))
    except ApqaError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"wrote {written} points of {len(runs)} run(s) to {url} bucket {bucket}")


@export_app.command(epilog=EPILOG)
def verify(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the .verify.json files.")],
    db: DbOption = None,
    run: Annotated[str, typer.Option(help="Run id or 'latest'.")] = "latest",
) -> None:
    """Write a run as lsst.verify Job JSON documents (one per tag set, like ap_verify)."""
    from apqa.store import MetricStore
    from apqa.store.verify_job import write_verify_jobs

    try:
        store = MetricStore(db, create=False)
        info = store.resolve_run(run)
        paths = write_verify_jobs(info, store.measurements(info.id), out)
    except ApqaError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"wrote {len(paths)} lsst.verify job file(s) for run {info.id} to {out}")
