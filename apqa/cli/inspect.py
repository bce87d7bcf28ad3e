"""``apqa inspect``: what apqa reads from a FITS exposure (apqa format or a plain image)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from apqa.cli.app import app, fail, prose
from apqa.errors import ApqaError

if TYPE_CHECKING:
    from apqa.datamodel import Exposure

EPILOG = prose("""Examples:

  apqa inspect sim-out/raw/raw_410001_01.fits

  apqa inspect my_image.fits --json
""")


def exposure_summary(exposure: Exposure) -> dict:
    """A JSON-able summary of an exposure: pixels, WCS, PSF, calibration, visit info."""
    import numpy as np

    mask = exposure.mask
    summary: dict = {
        "shape": list(exposure.shape),
        "image_median": float(np.median(exposure.image)),
        "variance_median": float(np.median(exposure.variance[np.isfinite(exposure.variance)]))
        if np.isfinite(exposure.variance).any() else None,
        "mask_fractions": {name: float(mask.is_set(name).mean()) for name in mask.planes
                           if mask.is_set(name).any()},
    }
    if exposure.wcs is not None:
        ra, dec = exposure.pixel_to_sky([(exposure.width - 1) / 2], [(exposure.height - 1) / 2])
        scale = float(np.sqrt(abs(np.linalg.det(exposure.wcs.celestial.pixel_scale_matrix))))
        summary["wcs"] = {"ctype": list(exposure.wcs.wcs.ctype), "center_ra": float(ra[0]),
                          "center_dec": float(dec[0]), "pixel_scale_arcsec": scale * 3600,
                          "sip": exposure.wcs.sip is not None}
    if exposure.psf is not None:
        summary["psf"] = {"type": type(exposure.psf).__name__, "fwhm_px": exposure.psf.fwhm}
    if exposure.photo_calib is not None:
        summary["photo_calib"] = {"njy_per_count": exposure.photo_calib.calibration_mean,
                                  "zero_point": exposure.photo_calib.zero_point}
    if exposure.visit_info is not None:
        summary["visit_info"] = exposure.visit_info.to_dict()
    if exposure.detector_info is not None:
        summary["detector_info"] = exposure.detector_info.to_dict()
    return summary


@app.command(epilog=EPILOG)
def inspect(
    path: Annotated[Path, typer.Argument(help="An apqa exposure or a plain FITS image.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
    = False,
) -> None:
    """Show what apqa reads from a FITS exposure: shape, WCS, PSF, calibration, visit info."""
    from apqa.datamodel import Exposure

    try:
        summary = exposure_summary(Exposure.from_fits(path))
    except ApqaError as exc:
        raise fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    table = Table(title=str(path), show_header=False)
    for key, value in summary.items():
        text = (", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict)
                else str(value))
        table.add_row(key, text)
    Console().print(table)
