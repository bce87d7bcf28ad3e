"""``apqa inject``: draw fakes into an exposure, and ``apqa inject generate-catalog``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from apqa.cli.app import app, fail, prose
from apqa.errors import ApqaError, InputError

EPILOG = prose("""Examples:

  apqa inject generate-catalog --exposure proc/calexp.fits --hosts proc/sources.parquet
  --n 500 --mix isolated=0.4,hosted=0.4,negative=0.2 --out fakes.parquet

  apqa inject --exposure proc/calexp.fits --catalog fakes.parquet --out injected.fits

  apqa inject --exposure template.fits --catalog fakes.parquet --target template
  --out injected_template.fits --no-noise

E is an apqa exposure (e.g. calexp.fits from apqa process) or a plain FITS image with a header
WCS and MAGZERO (and GAIN for the noise); a plain image's PSF is estimated first. OUT.fits gets
the injected exposure (INJECTED or INJECTED_TEMPLATE mask plane over the fakes' pixels) and
OUT.parquet, next to it, the fakes drawn into it with x, y and injection_flag (0 = drawn;
bits: 1 bad mag, 2 off image, 4 FFT too large, 8 PSF failure, 16 unknown kind, 32 bad shape).
""")

GENERATE_EPILOG = prose("""Examples:

  apqa inject generate-catalog --exposure calexp.fits --n 200 --out fakes.parquet

  apqa inject generate-catalog --exposure calexp.fits --density 5000 --mag-min 21
  --mag-max 26 --mix isolated=0.3,hosted=0.3,variable=0.1,negative=0.1,trail=0.1,sersic=0.1
  --hosts sources.parquet --seed 7 --out fakes.parquet

  apqa inject generate-catalog --exposure calexp.fits --mix stamp=1 --stamp galaxy.fits
  --n 20 --out stamps.parquet

Fake classes: isolated, hosted (on galaxies of --hosts: an apqa process sources.parquet or a
table with ra, dec, mag, sersic_n, half_light_radius, q, beta), variable (science and template
differ), negative (template only), trail, sersic, stamp (--stamp FITS files). Positions follow
a Halton sequence; everything is a function of --seed. --config takes a YAML file with the
CatalogConfig keys (n, density, mix, mag_range, sersic_n, sersic_hlr, sersic_q, variable_dmag,
trail_rate, exposure_time, host_mag, host_min_extendedness, margin, stamps, id_start).
""")

inject_app = typer.Typer(
    help="Draw fake sources into an exposure; generate injection catalogs.",
    invoke_without_command=True, add_completion=False, rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(inject_app, name="inject")


def _read_table(path: Path):
    import pandas as pd

    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for non-Parquet input
        raise InputError(f"{path}: not a readable Parquet table ({exc})") from None


def _with_psf(exposure, source: Path, console: Console):
    """The exposure with a PSF model: estimated (ISR + characterization) when it has none."""
    if exposure.psf is not None:
        return exposure
    import dataclasses

    from apqa.pipeline.diffim.subtract import prepare_exposure

    with console.status(f"estimating the PSF of {source.name}"):
        prepared, _ = prepare_exposure(exposure)
    return dataclasses.replace(exposure, psf=prepared.psf)


@inject_app.callback(invoke_without_command=True, epilog=EPILOG)
def inject(
    ctx: typer.Context,
    exposure: Annotated[Path | None, typer.Option(help="Exposure to inject into (FITS).")]
    = None,
    catalog: Annotated[Path | None, typer.Option(help="Injection catalog (Parquet).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Injected exposure to write; "
                                             "the drawn catalog goes to OUT.parquet.")] = None,
    noise: Annotated[bool, typer.Option("--noise/--no-noise",
                                        help="Add the fakes' Poisson noise.")] = True,
    target: Annotated[str, typer.Option(help="science or template.")] = "science",
    seed: Annotated[int, typer.Option(help="Noise seed (with visit and detector).")] = 0,
) -> None:
    """Inject the fakes of CATALOG into EXPOSURE, convolved with its PSF (see examples)."""
    if ctx.invoked_subcommand is not None:
        return
    if exposure is None and catalog is None and out is None:
        typer.echo(ctx.get_help())
        raise typer.Exit()
    from apqa.datamodel import Exposure
    from apqa.injection.catalog import read_catalog, write_catalog
    from apqa.injection.draw import inject as draw_fakes

    console = Console(stderr=True)
    try:
        missing = [f"--{name}" for name, value in
                   (("exposure", exposure), ("catalog", catalog), ("out", out)) if value is None]
        if missing:
            raise InputError(f"missing option(s) {', '.join(missing)}")
        table_out = out.with_suffix(".parquet")
        if table_out == out:
            raise InputError(f"--out {out}: expected a FITS name (the catalog goes to "
                             f"{table_out})")
        start = time.perf_counter()
        fakes = read_catalog(catalog)
        with console.status(f"reading {exposure.name}"):
            image = Exposure.from_fits(exposure)
        image = _with_psf(image, exposure, console)
        with console.status(f"injecting {len(fakes)} fakes"):
            result, drawn = draw_fakes(image, fakes, seed=seed, noise=noise, target=target)
        result.write_fits(out)
        write_catalog(drawn, table_out)
    except ApqaError as exc:
        raise fail(str(exc)) from None
    n_ok = int((drawn["injection_flag"] == 0).sum())
    typer.echo(f"{out}: {n_ok} of {len(drawn)} {target} fakes drawn "
               f"({len(drawn) - n_ok} flagged), catalog {table_out}, "
               f"{time.perf_counter() - start:.1f} s")


def _parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            mix[name.strip()] = float(value) if sep else 1.0
        except ValueError:
            raise InputError(f"--mix {text!r}: expected CLASS=FRACTION pairs, got {item!r}") \
                from None
    return mix


@inject_app.command("generate-catalog", epilog=GENERATE_EPILOG)
def generate_catalog_command(
    exposure: Annotated[Path, typer.Option(help="Exposure the fakes are for (FITS).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Catalog to write (Parquet).")],
    n: Annotated[int | None, typer.Option("--n", help="Number of fakes.")] = None,
    density: Annotated[float | None, typer.Option(help="Fakes per deg^2 (overrides --n).")]
    = None,
    mix: Annotated[str | None, typer.Option(help="CLASS=FRACTION,... (default isolated=1).")]
    = None,
    mag_min: Annotated[float | None, typer.Option(help="Brightest AB magnitude.")] = None,
    mag_max: Annotated[float | None, typer.Option(help="Faintest AB magnitude.")] = None,
    hosts: Annotated[Path | None, typer.Option(help="Source catalog or host table (Parquet) "
                                               "for hosted fakes.")] = None,
    stamp: Annotated[list[Path] | None, typer.Option(help="Postage stamp FITS (repeatable).")]
    = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    config: Annotated[Path | None, typer.Option(help="YAML CatalogConfig file.")] = None,
) -> None:
    """Generate an injection catalog for an exposure (Halton positions, kinds, hosts)."""
    from apqa.config import config_from_mapping, load_config
    from apqa.datamodel import Exposure
    from apqa.injection.catalog import CatalogConfig, generate_catalog, write_catalog

    try:
        cfg = load_config(CatalogConfig, config)
        updates = {"n": n, "density": density, "mix": _parse_mix(mix) if mix else None,
                   "stamps": [str(p) for p in stamp] if stamp else None}
        if mag_min is not None or mag_max is not None:
            updates["mag_range"] = (mag_min if mag_min is not None else cfg.mag_range[0],
                                    mag_max if mag_max is not None else cfg.mag_range[1])
        cfg = config_from_mapping(
            CatalogConfig, {**cfg.model_dump(), **{k: v for k, v in updates.items()
                                                   if v is not None}}, "command-line options")
        image = Exposure.from_fits(exposure)
        host_table = _read_table(hosts) if hosts is not None else None
        table = generate_catalog(image, cfg, hosts=host_table, seed=seed)
        write_catalog(table, out)
    except ApqaError as exc:
        raise fail(str(exc)) from None
    counts = table["fake_class"].value_counts().to_dict()
    typer.echo(f"{out}: {len(table)} fakes " + ", ".join(f"{k} {v}" for k, v in counts.items()))
