"""``apqa run``: DIASources of one science image against one template, from plain FITS."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from apqa import __version__
from apqa.atomic import write_json, write_parquet
from apqa.cli.app import SciencePsfOption, TemplatePsfOption, all_cores, app, fail, prose
from apqa.config import config_hash, load_config
from apqa.errors import ApqaError, InputError

EPILOG = prose("""Examples:

  apqa run --science new.fits --template ref.fits --out run1

  apqa run --science new.fits --template ref.fits --out run1 --algorithm zogy

  apqa run --science proc_new/calexp.fits --template proc_ref/calexp.fits --out run1
  --config run.yaml

Inputs are plain FITS images (header WCS, GAIN, RDNOISE, SATURATE, MAGZERO, EXPTIME, FILTER,
MJD-OBS) or apqa exposures; calexps from `apqa process` are used as they are, anything else is
calibrated here (ISR masks and cosmic rays, background, PSF). Outputs: DIR/diaSources.parquet
(Rubin APDB DiaSource columns and units), DIR/difference.fits and DIR/run.json (configuration,
versions, per-stage timings, peak memory, quality numbers). The DIASources are associated
into an APDB (default DIR/apdb.sqlite; --apdb postgresql://... for PostgreSQL) and one alert
packet per DIASource goes to DIR/alerts/alerts_VISIT_DETECTOR.avro (and to Kafka with
--kafka-bootstrap). Running two visits into the same --apdb builds light curves.
""")


def _versions() -> dict[str, str]:
    import astropy
    import galsim
    import numpy
    import pandas
    import scipy
    import sep

    return {"apqa": __version__, "python": platform.python_version(), "numpy": numpy.__version__,
            "scipy": scipy.__version__, "astropy": astropy.__version__,
            "galsim": galsim.__version__, "pandas": pandas.__version__, "sep": sep.__version__}


def _calibrated(exposure, path: Path, zero_point: float | None, band: str | None = None):
    """The exposure with a photometric calibration (its own, or one from ``zero_point``) and
    an APDB band (its own, or ``band``)."""
    from dataclasses import replace

    from apqa.datamodel import PhotoCalib
    from apqa.datamodel.apdb_schema import require_apdb_band

    if zero_point is not None:
        exposure.photo_calib = PhotoCalib.from_zero_point(zero_point)
    if exposure.photo_calib is None:
        raise InputError(f"{path}: no photometric calibration (header MAGZERO or PHOTZP, BUNIT "
                         "in flux units, or an apqa exposure); DIASource fluxes are in nJy, so "
                         "pass --zero-point (and --template-zero-point if it differs)")
    info = exposure.visit_info
    if info is not None:
        exposure.visit_info = replace(info, band=require_apdb_band(
            band or info.band, info.physical_filter, str(path), "pass --band (e.g. --band K)"))
    return exposure


@app.command(epilog=EPILOG)
def run(
    science: Annotated[Path, typer.Option(help="Science image (FITS).")],
    template: Annotated[Path, typer.Option(help="Template image (FITS).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    algorithm: Annotated[str, typer.Option(help="al (Alard-Lupton + decorrelation) or zogy.")]
    = "al",
    config: Annotated[Path | None, typer.Option(help="YAML configuration file (RunConfig).")]
    = None,
    zero_point: Annotated[float | None, typer.Option(
        help="AB magnitude of one count of the science image, for images without MAGZERO.")]
    = None,
    template_zero_point: Annotated[float | None, typer.Option(
        help="The same for the template (default: --zero-point).")] = None,
    band: Annotated[str | None, typer.Option(
        help="APDB band (one character) for filters with longer names, e.g. JWST's F200W.")]
    = None,
    science_psf: SciencePsfOption = None,
    template_psf: TemplatePsfOption = None,
    apdb: Annotated[str | None, typer.Option(
        help="APDB URL (SQLite file or postgresql://...); default DIR/apdb.sqlite.")] = None,
    kafka_bootstrap: Annotated[str | None, typer.Option(
        help="Also publish the alerts to this Kafka broker (host:port).")] = None,
    alert_topic: Annotated[str, typer.Option(help="Kafka topic of the alerts.")]
    = "apqa-alerts",
) -> None:
    """Difference, detect and measure: the DIASource table of a science/template pair."""
    from apqa.datamodel import Exposure
    from apqa.datamodel.psf_file import read_psf_images
    from apqa.pipeline.alert_production import produce_alerts
    from apqa.pipeline.apdb import Apdb
    from apqa.pipeline.runner import RunConfig, run_pair

    console = Console(stderr=True)
    try:
        if algorithm not in ("al", "zogy"):
            raise InputError(f"--algorithm {algorithm!r}: expected 'al' or 'zogy'")
        cfg = load_config(RunConfig, config)
        cfg = cfg.model_copy(update={"diff": cfg.diff.model_copy(update={"algorithm": algorithm})})
        start = time.perf_counter()
        with all_cores(), console.status("reading") as status:
            sci = _calibrated(Exposure.from_fits(science), science, zero_point, band)
            tmp = _calibrated(Exposure.from_fits(template), template,
                              template_zero_point if template_zero_point is not None
                              else zero_point, band)
            psfs = read_psf_images(science_psf, template_psf)
            result = run_pair(sci, tmp, cfg, on_stage=lambda s: status.update(f"[bold]{s}"),
                              psfs=psfs)
            status.update("[bold]association and alerts")
            out.mkdir(parents=True, exist_ok=True)
            with Apdb.create(apdb or out / "apdb.sqlite") as database:
                produced = produce_alerts(database, result.dia_sources,
                                          result.diffim.difference, result.science,
                                          result.template, out / "alerts", cfg.alerts,
                                          kafka_bootstrap, alert_topic)
            result.timings.update(produced.timings)
            status.update("[bold]writing")
            write_start = time.perf_counter()
            result.diffim.difference.write_fits(out / "difference.fits")
            write_parquet(produced.dia_sources, out / "diaSources.parquet")
            result.timings["write"] = time.perf_counter() - write_start
        info = {
            "science": str(science), "template": str(template), "algorithm": algorithm,
            "versions": _versions(), "config": cfg.model_dump(mode="json"),
            "config_hash": config_hash(cfg), "timings": result.timings,
            "wall_time": time.perf_counter() - start, "peak_rss_bytes": result.peak_rss_bytes,
            "quality": result.quality, "suppressed": result.suppressed,
            "n_dia_sources": len(result.dia_sources), "association": produced.counts,
            "n_forced_sources": produced.n_forced,
            "alerts": {"path": str(produced.alerts.path), "count": produced.alerts.n_alerts,
                       "bytes": produced.alerts.total_bytes,
                       "delivered": produced.alerts.delivered,
                       "failed": produced.alerts.failed},
        }
        write_json(info, out / "run.json")
    except ApqaError as exc:
        raise fail(str(exc)) from None
    q = result.quality
    table = Table(title=f"apqa run: {science.name} - {template.name}", show_header=False)
    dia = result.dia_sources
    rows = [
        ("DIASources", f"{len(dia)} ({int(dia['isNegative'].sum())} negative, "
                       f"{int(dia['isDipole'].sum())} dipoles)"),
        ("suppressed", ", ".join(f"{k} {v}" for k, v in result.suppressed.items())),
        ("noise ratio", f"{q.get('noise_ratio', float('nan')):.3f} "
                        f"(sky sources {q.get('sky_source_pull_std', float('nan')):.3f})"),
        ("template coverage", f"{q.get('template_coverage', 1.0):.3f}"),
        ("DiaObjects", f"{int(produced.counts.get('numNewDiaObjects', 0))} new, "
                       f"{int(produced.counts.get('numUpdatedDiaObjects', 0))} updated"),
        ("alerts", f"{produced.alerts.n_alerts} in {produced.alerts.path}"
                   + (f" ({produced.alerts.failed} not delivered)"
                      if produced.alerts.failed else "")),
        ("wall time", " ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())),
        ("peak memory", f"{result.peak_rss_bytes / 1e9:.2f} GB"),
        ("outputs", str(out)),
    ]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)
