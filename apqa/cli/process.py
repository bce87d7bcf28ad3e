"""``apqa process``: ISR, characterization and calibration of one exposure."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from apqa import __version__
from apqa.atomic import write_json, write_parquet
from apqa.cli.app import all_cores, app, fail, prose
from apqa.config import config_hash, load_config
from apqa.errors import ApqaError, InputError

if TYPE_CHECKING:
    import pandas as pd

EPILOG = prose("""Examples:

  apqa process --exposure my_image.fits --refcat gaia.parquet --out proc

  apqa process --exposure sim/raw/raw_410001_01.fits --bias sim/calib/bias_01.fits
  --flat sim/calib/flat_g_01.fits --defects sim/calib/defects_01.parquet
  --refcat sim/refcat.parquet --out proc

Outputs: DIR/calexp.fits (fitted TAN-SIP WCS, PSF, photometric calibration), DIR/sources.parquet
(Rubin Source column names, fluxes in nJy) and DIR/process.json (quality numbers, timings,
configuration and versions).
""")


def _read_defects(path: Path) -> pd.DataFrame:
    import pandas as pd

    if not path.is_file():
        raise InputError(f"{path}: defects file not found")
    try:
        table = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for non-Parquet input
        raise InputError(f"{path}: not a readable Parquet table ({exc})") from None
    missing = {"x0", "x1", "y0", "y1"} - set(table.columns)
    if missing:
        raise InputError(f"{path}: defects table lacks columns {sorted(missing)}")
    return table


def write_outputs(out: Path, result, info: dict) -> None:
    """Write calexp.fits, sources.parquet and process.json, each atomically."""
    result.calexp.write_fits(out / "calexp.fits")
    write_parquet(result.sources, out / "sources.parquet")
    write_json(info, out / "process.json")


@app.command(epilog=EPILOG)
def process(
    exposure: Annotated[Path, typer.Option(help="Raw apqa exposure or plain FITS image.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    refcat: Annotated[Path | None, typer.Option(
        help="Reference catalog (Parquet, CSV or FITS; Gaia DR3 column names).")] = None,
    bias: Annotated[Path | None, typer.Option(help="Master bias (needed for raw data).")] = None,
    flat: Annotated[Path | None, typer.Option(help="Master flat.")] = None,
    defects: Annotated[Path | None, typer.Option(help="Defects table (Parquet).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML configuration file.")] = None,
) -> None:
    """Calibrate one exposure: ISR, background, PSF model, sources, astrometry, zero point."""
    from apqa.datamodel import Exposure
    from apqa.pipeline.refcat import load_refcat
    from apqa.pipeline.single_visit import SingleVisitConfig, process_exposure

    console = Console(stderr=True)
    try:
        cfg = load_config(SingleVisitConfig, config)
        raw = Exposure.from_fits(exposure)
        bias_exp = Exposure.from_fits(bias, require_wcs=False) if bias else None
        flat_exp = Exposure.from_fits(flat, require_wcs=False) if flat else None
        defects_table = _read_defects(defects) if defects else None
        ref = load_refcat(refcat) if refcat else None
        start = time.perf_counter()
        with all_cores(), console.status("processing") as status:
            result = process_exposure(raw, bias_exp, flat_exp, defects_table, ref, cfg,
                                      on_stage=lambda s: status.update(f"[bold]{s}"))
        info = {
            "exposure": str(exposure), "refcat": str(refcat) if refcat else None,
            "apqa_version": __version__, "config": cfg.model_dump(mode="json"),
            "config_hash": config_hash(cfg), "quality": result.quality,
            "timings": result.timings, "wall_time": time.perf_counter() - start,
        }
        write_outputs(out, result, info)
    except ApqaError as exc:
        raise fail(str(exc)) from None
    table = Table(title=f"apqa process: {exposure.name}", show_header=False)
    q = result.quality
    rows = [
        ("PSF FWHM", f"{q['psf_fwhm_px']:.3f} px from {int(q['n_psf_stars'])} stars"),
        ("background rms", f"{q['background_rms']:.2f} counts"),
        ("cosmic rays", f"{int(q['cr_count'])}"),
        ("sources", f"{len(result.sources)}"),
        ("astrometric scatter", f"{q['astrometric_scatter_mas']:.1f} mas "
                                f"({int(q['n_astrometry_matches'])} matches)"),
        ("zero point", _zero_point_text(q, result.calexp)),
        ("wall time", " ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())),
        ("outputs", str(out)),
    ]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def _zero_point_text(quality: dict, calexp) -> str:
    """The fitted zero point, or the one the image came with when nothing was fitted (no
    reference catalog): what the calexp's fluxes are calibrated with either way."""
    import math

    if math.isfinite(quality["zero_point"]):
        return f"{quality['zero_point']:.4f} +- {quality['zero_point_err_mmag']:.1f} mmag"
    if calexp.photo_calib is not None:
        return (f"{calexp.photo_calib.zero_point:.4f} from the image's header (MAGZERO or "
                "BUNIT); none fitted without --refcat")
    return "none: no --refcat, and no MAGZERO or flux units in the header"
