"""``apqa inject-and-run``: inject fakes into a dataset, run the AP pipeline on every
visit-detector, match, compute and store the metrics, optionally gate them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from apqa.cli.app import all_cores, app, fail, prose
from apqa.errors import ApqaError, InputError

EPILOG = prose("""Examples:

  apqa inject-and-run

  apqa inject-and-run --dataset crowded-sim --visits 4 --detectors 2 --n-fakes 500 --out bulge

  apqa inject-and-run --dataset my_field/ --scheduler tcp://10.0.0.5:8786 --db postgresql://...

  apqa inject-and-run --out run1 --resume --thresholds ci/thresholds.yaml --json

--dataset is an embedded dataset (hits-sim, cosmos-sim, crowded-sim; simulated on demand) or a
folder with a manifest.json (the output of `apqa simulate` is one). --visits N and
--detectors N take the first N science visits and detectors (default for embedded datasets: 2
visits, 1 detector). --scheduler: 'process' (in this process), 'local:N' (a Dask LocalCluster
of N worker processes; default local:2 for several units) or a Dask scheduler address whose
workers share the output folder. Outputs: OUT/units/v{visit}_d{det}/ (science, template and
difference FITS, fakes, diaSources and matched Parquet tables, unit.json with status, timings,
peak memory and checksums), OUT/apdb.sqlite, OUT/alerts/*.avro and OUT/run.json. Exit
code 1 when a unit failed (the others complete), 2 for bad input.
""")


def _summary_table(report) -> Table:
    table = Table(title=f"apqa inject-and-run: {report.out}")
    table.add_column("metric", no_wrap=True)
    for column in ("value", "unit", "tags"):
        table.add_column(column)
    wanted = {"apqa.completeness.m50", "apqa.completeness.snr50", "apqa.completeness.plateau",
              "apqa.photometry.psfFluxBias", "apqa.diffim.noiseRatio",
              "apqa.artifacts.falsePositiveDensity", "apqa.runtime.wallPerDetector",
              "apqa.alerts.count"}
    for m in report.measurements:
        if m.metric in wanted and m.tags.get("visit", "all") == "all" \
                and m.tags.get("fake_class", "all") == "all" \
                and m.tags.get("snr_bin", "10-inf") == "10-inf":
            err = f" ± {m.uncertainty:.3g}" if m.uncertainty is not None else ""
            extra = {k: v for k, v in m.tags.items() if k not in ("dataset", "algorithm")}
            table.add_row(m.metric, f"{m.value:.4g}{err}", m.unit,
                          ", ".join(f"{k}={v}" for k, v in extra.items()))
    return table


def _json(report) -> dict:
    return {"out": str(report.out), "run_json": str(report.run_json),
            "n_units": len(report.units), "n_failed": report.n_failed,
            "failed": [{"visit": r["visit"], "detector": r["detector"], "error": r["error"]}
                       for r in report.units if r["status"] == "failed"],
            "metric_store": report.store_url, "metric_run_id": report.store_run_id,
            "gate": None if report.gate is None else report.gate.passed,
            "wall": report.wall,
            "measurements": [{"metric": m.metric, "value": m.value, "unit": m.unit,
                              "uncertainty": m.uncertainty, "tags": m.tags}
                             for m in report.measurements]}


@app.command("inject-and-run", epilog=EPILOG)
def inject_and_run_command(
    dataset: Annotated[str, typer.Option(help="Embedded dataset name or a manifest folder.")]
    = "hits-sim",
    visits: Annotated[int | None, typer.Option(min=1, help="First N science visits.")] = None,
    detectors: Annotated[int | None, typer.Option(min=1, help="First N detectors.")] = None,
    n_fakes: Annotated[int | None, typer.Option(min=0, help="Fakes per visit-detector "
                                                "(default 200 per 2048x4096 pixels).")] = None,
    fake_density: Annotated[float | None, typer.Option(help="Fakes per deg^2 instead.")] = None,
    fake_kinds: Annotated[str | None, typer.Option(
        help="Comma list of point,hosted,variable,negative,trail.")] = None,
    algorithm: Annotated[str | None, typer.Option(help="al or zogy.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")] = Path("apqa-run"),
    db: Annotated[str | None, typer.Option(help="Metric store URL (default $APQA_DB or "
                                           "~/.local/share/apqa/metrics.db).")] = None,
    apdb: Annotated[str | None, typer.Option(help="APDB URL (default OUT/apdb.sqlite).")]
    = None,
    scheduler: Annotated[str | None, typer.Option(help="process, local:N or tcp://host:port.")]
    = None,
    config: Annotated[Path | None, typer.Option(help="YAML configuration (InjectRunConfig).")]
    = None,
    seed: Annotated[int, typer.Option(min=0, help="Master seed.")] = 0,
    resume: Annotated[bool, typer.Option(help="Skip units already done (checksums verified).")]
    = False,
    thresholds: Annotated[Path | None, typer.Option(help="Gate thresholds YAML.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress, no table.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")]
    = False,
) -> None:
    """Inject fakes, run the AP pipeline on every visit-detector, measure and store metrics."""
    from apqa.config import load_config
    from apqa.pipeline.inject_run import RunOptions, inject_and_run
    from apqa.pipeline.run_units import InjectRunConfig

    console = Console(stderr=True)
    try:
        cfg = load_config(InjectRunConfig, config)
        update: dict = {}
        if n_fakes is not None:
            update["n_fakes"] = n_fakes
        if fake_density is not None:
            update["fake_density"] = fake_density
        if fake_kinds is not None:
            update["fake_kinds"] = [k.strip() for k in fake_kinds.split(",") if k.strip()]
        if algorithm is not None:
            if algorithm not in ("al", "zogy"):
                raise InputError(f"--algorithm {algorithm!r}: expected 'al' or 'zogy'")
            run = cfg.run.model_copy(update={"diff": cfg.run.diff.model_copy(
                update={"algorithm": algorithm})})
            update["run"] = run
        cfg = InjectRunConfig.model_validate({**cfg.model_dump(), **{
            k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in update.items()}})
        cfg.catalog_config()  # unknown fake kinds fail here, before any work
        opts = RunOptions(out=out, dataset=dataset, n_visits=visits, n_detectors=detectors,
                          seed=seed, config=cfg, db=db, apdb=apdb, scheduler=scheduler,
                          resume=resume, thresholds=thresholds)
        with all_cores(), Progress(TextColumn("{task.description}"), BarColumn(),
                                   MofNCompleteColumn(),
                      TextColumn("{task.fields[failed]} failed"), TimeRemainingColumn(),
                      console=console, disable=quiet or as_json) as progress:
            task = progress.add_task("units", total=None, failed=0)
            failed = [0]

            def on_unit(record: dict) -> None:
                failed[0] += record["status"] == "failed"
                progress.update(task, advance=1, failed=failed[0])

            report = inject_and_run(
                opts, on_start=lambda n: progress.update(task, total=n),
                on_unit=on_unit,
                on_stage=lambda s: progress.update(task, description=s))
    except (ApqaError, ValueError) as exc:
        raise fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    if as_json:
        typer.echo(json.dumps(_json(report), default=float))
    elif not quiet:
        out_console = Console()
        out_console.print(_summary_table(report))
        for r in report.units:
            if r["status"] == "failed":
                out_console.print(f"[red]failed[/red] visit {r['visit']} detector "
                                  f"{r['detector']}: {r['error']}", markup=True)
        if report.gate is not None:
            out_console.print(f"gate: {'passed' if report.gate.passed else 'FAILED'} "
                              f"({len(report.gate.failures)} of {len(report.gate.checks)} "
                              "checks failed)")
        out_console.print(f"{len(report.units) - report.n_failed}/{len(report.units)} units "
                          f"done in {report.wall:.1f} s ({report.scheduler}); outputs "
                          f"{report.out}, run.json, APDB {report.apdb}; metrics run "
                          f"{report.store_run_id} in {report.store_url}")
    # A failed unit or a failed gate both fail the job (CI relies on this).
    if report.n_failed or (report.gate is not None and not report.gate.passed):
        raise typer.Exit(1)
