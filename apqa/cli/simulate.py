"""``apqa simulate``: write an embedded simulated dataset with its truth."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from apqa.cli.app import app, fail, prose
from apqa.config import config_from_mapping, load_config
from apqa.errors import ApqaError

EPILOG = prose("""Examples:

  apqa simulate --dataset hits-sim --out sim-out

  apqa simulate --dataset cosmos-sim --visits 6 --detectors 2 --seed 7 --out cosmos

  apqa simulate --config sim.yaml --out sim-out

The --config YAML takes the keys dataset, n_visits, n_detectors, n_template_visits, seed and
write_noiseless.
""")


@app.command(epilog=EPILOG)
def simulate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (new or empty).")],
    dataset: Annotated[str | None, typer.Option(
        "--dataset", "-d", help="hits-sim, cosmos-sim or crowded-sim [default: hits-sim].")] = None,
    visits: Annotated[int | None, typer.Option(help="Science visits per detector [4].")] = None,
    detectors: Annotated[int | None, typer.Option(help="Detectors per visit [1].")] = None,
    templates: Annotated[int | None, typer.Option(help="Deep template visits [1].")] = None,
    seed: Annotated[int | None, typer.Option(help="Master random seed [0].")] = None,
    noiseless: Annotated[bool | None, typer.Option(
        "--noiseless/--no-noiseless", help="Also write noiseless model images.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML configuration file.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
) -> None:
    """Simulate an embedded survey dataset: raw exposures, calibration frames, a reference
    catalog and truth tables, listed in DIR/manifest.json."""
    # Here, not at the top: the simulator's imports take a second, and `apqa --help` loads
    # every command module.
    from apqa.sim.config import SimulationConfig
    from apqa.sim.survey import SurveySimulator

    try:
        base = load_config(SimulationConfig, config)
        overrides = {key: value for key, value in {
            "dataset": dataset, "n_visits": visits, "n_detectors": detectors,
            "n_template_visits": templates, "seed": seed, "write_noiseless": noiseless,
        }.items() if value is not None}
        if dataset is not None:
            from apqa.sim.datasets import get_dataset

            get_dataset(dataset)  # one clear line for unknown names
        cfg = config_from_mapping(SimulationConfig, {**base.model_dump(), **overrides},
                                  "command-line options")
        sim = SurveySimulator(cfg)
        total = len(sim.plans) * len(sim.detectors)
        start = time.perf_counter()
        console = Console(stderr=True)
        with Progress(TextColumn("[bold]simulate[/] {task.description}"), BarColumn(),
                      MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                      transient=True) as bar:
            task = bar.add_task(cfg.dataset, total=total)
            manifest = sim.write(out, overwrite=overwrite,
                                 progress=lambda _: bar.advance(task))
        elapsed = time.perf_counter() - start
    except ApqaError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"{cfg.dataset}: {total} exposures ({len(sim.plans)} visits x "
               f"{len(sim.detectors)} detectors) in {elapsed:.1f} s -> {manifest}")
