"""Calibration and difference-image quality per exposure, with run medians.

``calibration`` records: ``visit``, ``detector``, and any of ``psf_fwhm`` (arcsec),
``astrom_scatter`` (mas), ``zero_point_error`` (mmag). ``diffim`` records: ``visit``,
``detector``, and any of ``noise_ratio``, ``residual_footprint_ratio``, ``template_coverage``
(the quality numbers of ``apqa diff``). Numbers are in those units; astropy Quantities are
converted.
"""

from __future__ import annotations

from apqa.metrics.records import Records, per_exposure, to_frame
from apqa.metrics.registry import Measurement

CALIBRATION_COLUMNS = {
    "psf_fwhm": "apqa.calibration.psfFwhm",
    "astrom_scatter": "apqa.calibration.astromScatter",
    "zero_point_error": "apqa.calibration.zeroPointError",
}
DIFFIM_COLUMNS = {
    "noise_ratio": "apqa.diffim.noiseRatio",
    "residual_footprint_ratio": "apqa.diffim.residualFootprintRatio",
    "template_coverage": "apqa.diffim.templateCoverage",
}


def calibration_metrics(records: Records, tags: dict[str, str]) -> list[Measurement]:
    """Per-exposure PSF FWHM, astrometric scatter and zero-point error, and their medians."""
    frame = to_frame(records, "calibration")
    out: list[Measurement] = []
    for column, metric in CALIBRATION_COLUMNS.items():
        out += per_exposure(frame, column, metric, tags, "calibration")
    return out


def diffim_metrics(records: Records, tags: dict[str, str]) -> list[Measurement]:
    """Per-exposure difference-image noise ratio, residual ratio, coverage, and their medians."""
    frame = to_frame(records, "diffim")
    out: list[Measurement] = []
    for column, metric in DIFFIM_COLUMNS.items():
        out += per_exposure(frame, column, metric, tags, "diffim")
    return out
