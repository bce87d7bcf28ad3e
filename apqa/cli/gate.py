"""``apqa gate``: pass or fail a run on absolute thresholds and a statistical regression test."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from apqa.cli.app import app, fail
from apqa.cli.db import DbOption
from apqa.errors import ApqaError

EXIT_FAILED = 1

EPILOG = "\n\n".join([
    "Examples:",
    "  apqa gate --run latest --thresholds ci/thresholds.yaml",
    "  apqa gate --db postgresql://postgres@127.0.0.1/test --run 42 --thresholds "
    "ci/thresholds.yaml --baseline latest-main --junit gate.xml --markdown gate.md",
    "Exit code 0 when every check passes, 1 when one fails, 2 on an error (bad thresholds "
    "file, unknown run, unreachable database). The regression test against --baseline fails a "
    "value only when its change in the bad direction is significant given both runs' "
    "uncertainties (or, for values without one, the recent run-to-run scatter), with the "
    "chance of failing on noise alone kept below --alpha over all values tested.",
])


@app.command(epilog=EPILOG)
def gate(
    run: Annotated[str, typer.Option(help="Run id or 'latest'.")],
    thresholds: Annotated[Path, typer.Option(help="Thresholds YAML file.")],
    db: DbOption = None,
    baseline: Annotated[str | None, typer.Option(
        help="Baseline run id, 'latest' or 'latest-main' for the regression test.")] = None,
    junit: Annotated[Path | None, typer.Option(help="Write a JUnit XML report here.")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Write a Markdown report here.")] = None,
    alpha: Annotated[float, typer.Option(
        help="Largest chance of a regression failure on noise alone.")] = 0.01,
) -> None:
    """Gate a run: thresholds (units converted) and regression against a baseline run."""
    from apqa.ci.gate import evaluate_gate
    from apqa.ci.report import markdown as to_markdown
    from apqa.ci.report import rich_table, write_junit
    from apqa.ci.thresholds import load_thresholds
    from apqa.store import MetricStore

    try:
        limits = load_thresholds(thresholds)
        store = MetricStore(db, create=False)
        report = evaluate_gate(store, run, limits, baseline, alpha=alpha)
    except ApqaError as exc:
        raise fail(str(exc)) from None
    Console(width=160).print(rich_table(report))
    for note in report.notes:
        typer.echo(f"note: {note}")
    if junit is not None:
        write_junit(report, junit)
    if markdown is not None:
        markdown.write_text(to_markdown(report))
    if not report.passed:
        raise typer.Exit(EXIT_FAILED)
