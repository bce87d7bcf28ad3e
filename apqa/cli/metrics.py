"""``apqa metrics``: the metric registry, one run's measurements, two runs compared."""

from __future__ import annotations

import json
import math
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from apqa.cli.app import app, fail, prose
from apqa.cli.db import DbOption
from apqa.errors import ApqaError

EPILOG = prose("""Examples:

  apqa metrics list

  apqa metrics show latest

  apqa metrics show 12 --db postgresql://postgres@127.0.0.1/test --metric apqa.completeness

  apqa metrics compare 11 12 --metric apqa.photometry

RUN is a run id or `latest` (the newest succeeded run).
""")

metrics_app = typer.Typer(name="metrics", help="Declared metrics and stored measurements.",
                          epilog=EPILOG, no_args_is_help=True)
app.add_typer(metrics_app)

MetricFilter = Annotated[str | None, typer.Option(
    "--metric", help="Only metrics whose name starts with this prefix.")]


def _fmt(value: float, unc: float | None = None) -> str:
    if math.isnan(value):
        return "NaN"
    text = f"{value:.6g}"
    return text if unc is None or math.isnan(unc) else f"{text} ± {unc:.2g}"


@metrics_app.command("list", epilog=EPILOG)
def list_metrics(
    prefix: MetricFilter = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List every declared metric: unit, better direction, stage and description."""
    from apqa.metrics.registry import METRICS

    defs = [d for d in METRICS.values() if prefix is None or d.name.startswith(prefix)]
    if as_json:
        typer.echo(json.dumps([{"name": d.name, "unit": d.unit_str, "better": d.better,
                                "stage": d.stage, "description": d.description}
                               for d in defs], indent=1))
        return
    table = Table(title=f"{len(defs)} apqa metrics")
    for column in ("metric", "unit", "better", "stage", "description"):
        table.add_column(column, overflow="fold")
    for d in defs:
        table.add_row(d.name, d.unit_str, d.better, d.stage, d.description)
    Console().print(table)


@metrics_app.command(epilog=EPILOG)
def show(
    run: Annotated[str, typer.Argument(help="Run id or 'latest'.")],
    db: DbOption = None,
    prefix: MetricFilter = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the measurements of one run."""
    from apqa.store import MetricStore

    try:
        store = MetricStore(db, create=False)
        info = store.resolve_run(run)
        frame = store.measurement_frame([info.id])
    except ApqaError as exc:
        raise fail(str(exc)) from None
    if prefix is not None:
        frame = frame[frame["metric"].str.startswith(prefix)]
    if as_json:
        rows = [{"metric": r.metric, "value": None if math.isnan(r.value) else r.value,
                 "unit": r.unit, "uncertainty": None if math.isnan(r.uncertainty)
                 else r.uncertainty, "tags": r.tags} for r in frame.itertuples()]
        typer.echo(json.dumps({"run": info.id, "dataset": info.dataset, "status": info.status,
                               "measurements": rows}, indent=1))
        return
    title = (f"run {info.id}: {info.dataset}, {info.status}, "
             f"{info.started_at:%Y-%m-%d %H:%M} UTC, {info.git_branch or '-'} "
             f"{(info.git_sha or '')[:10]}, {len(frame)} measurements")
    table = Table(title=title)
    for column in ("metric", "tags", "value", "unit"):
        table.add_column(column, overflow="fold")
    for r in frame.sort_values("metric", kind="stable").itertuples():
        table.add_row(r.metric, ", ".join(f"{k}={v}" for k, v in sorted(r.tags.items())),
                      _fmt(r.value, r.uncertainty), r.unit)
    Console().print(table)


@metrics_app.command(epilog=EPILOG)
def compare(
    run_a: Annotated[str, typer.Argument(help="Reference run id or 'latest'.")],
    run_b: Annotated[str, typer.Argument(help="Run id or 'latest' compared with RUN_A.")],
    db: DbOption = None,
    prefix: MetricFilter = None,
) -> None:
    """Compare two runs value by value: change and its significance (sigma, from both runs'
    uncertainties; positive = worse in the metric's direction)."""
    from apqa.ci.gate import in_metric_unit
    from apqa.metrics.registry import METRICS
    from apqa.store import MetricStore

    try:
        store = MetricStore(db, create=False)
        a, b = store.resolve_run(run_a), store.resolve_run(run_b)
        frames = [in_metric_unit(store.measurement_frame([r.id])) for r in (a, b)]
    except ApqaError as exc:
        raise fail(str(exc)) from None
    pairs = frames[1].merge(frames[0][["key", "value", "uncertainty"]], on="key", how="outer",
                            suffixes=("", "_a"))
    pairs["metric"] = [k[0] for k in pairs["key"]]
    if prefix is not None:
        pairs = pairs[pairs["metric"].str.startswith(prefix)]
    table = Table(title=f"run {b.id} ({b.dataset}) against run {a.id} ({a.dataset})")
    for column in ("metric", "tags", f"run {a.id}", f"run {b.id}", "unit", "change",
                   "worse by (sigma)"):
        table.add_column(column, overflow="fold")
    for r in pairs.sort_values("metric", kind="stable").itertuples():
        definition = METRICS[r.metric]
        change = r.value - r.value_a
        sigma = math.hypot(r.uncertainty, r.uncertainty_a)
        z = definition.worsening(r.value, r.value_a) / sigma if sigma > 0 else math.nan
        z_text = "" if math.isnan(z) else f"{z:+.1f}"
        if not math.isnan(z) and abs(z) >= 3:
            z_text = f"[bold {'red' if z > 0 else 'green'}]{z_text}[/]"
        table.add_row(r.metric, ", ".join(f"{k}={v}" for k, v in r.key[1]),
                      _fmt(r.value_a, r.uncertainty_a), _fmt(r.value, r.uncertainty),
                      definition.unit_str, _fmt(change), z_text)
    Console().print(table)
