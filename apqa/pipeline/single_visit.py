"""Single-visit processing: ISR -> characterize -> calibrate, with timings and quality numbers.

The three stages stay separate (each takes and returns plain objects); this module only chains
them for ``apqa process``, ``apqa run`` and the dataset runner.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from pydantic import Field

from apqa.config import ConfigModel
from apqa.datamodel import Exposure
from apqa.pipeline.calibrate import CalibrateConfig, calibrate
from apqa.pipeline.characterize import CharacterizeConfig, characterize
from apqa.pipeline.isr import IsrConfig, IsrResult, run_isr
from apqa.pipeline.pixels import boxes

#: Source table columns in output order (Rubin Source names where they exist).
SOURCE_COLUMNS = [
    "sourceId", "visit", "detector", "x", "y", "xErr", "yErr", "ra", "dec",
    "psfFlux", "psfFluxErr", "psfChi2", "psfNdata", "apFlux", "apFluxErr", "snr",
    "ixx", "iyy", "ixy", "extendedness", "flags_saturated", "flags_bad", "flags_cr",
    "flags_interpolated", "flags_edge", "flags_blended", "calib_psf_candidate",
    "calib_psf_used", "calib_astrometry_used", "calib_photometry_used",
]


class SingleVisitConfig(ConfigModel):
    """Settings of the three single-visit stages."""

    isr: IsrConfig = Field(default_factory=IsrConfig)
    characterize: CharacterizeConfig = Field(default_factory=CharacterizeConfig)
    calibrate: CalibrateConfig = Field(default_factory=CalibrateConfig)


@dataclass
class SingleVisitResult:
    """Calibrated exposure, its source catalog, per-stage quality numbers and wall times."""

    calexp: Exposure
    sources: pd.DataFrame
    quality: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def _pixel_flags(exposure: Exposure, sources: pd.DataFrame, fwhm: float) -> pd.DataFrame:
    """flags_* columns from the mask planes within 2 pixels of each source's centre."""
    mask = exposure.mask
    ix = np.clip(np.rint(sources["x"]).astype(int), 0, exposure.width - 1).to_numpy()
    iy = np.clip(np.rint(sources["y"]).astype(int), 0, exposure.height - 1).to_numpy()
    window = boxes(mask.array, ix, iy, 2)
    out = sources.copy()
    for column, plane in (("flags_saturated", "SAT"), ("flags_bad", "BAD"), ("flags_cr", "CR"),
                          ("flags_interpolated", "INTRP")):
        out[column] = ((window & mask.bitmask(plane)) != 0).any(axis=(1, 2))
    margin = 2 * fwhm
    out["flags_edge"] = ((sources["x"] < margin) | (sources["y"] < margin)
                         | (sources["x"] > exposure.width - 1 - margin)
                         | (sources["y"] > exposure.height - 1 - margin))
    out["flags_blended"] = sources["blended"]
    return out


def process_exposure(raw: Exposure, bias: Exposure | None = None, flat: Exposure | None = None,
                     defects: pd.DataFrame | None = None, refcat: pd.DataFrame | None = None,
                     config: SingleVisitConfig | None = None,
                     on_stage: Callable[[str], None] | None = None) -> SingleVisitResult:
    """Run ISR, characterization and calibration on one exposure.

    ``on_stage`` is called with each stage's name as it starts (for progress display).
    """
    config = config or SingleVisitConfig()
    on_stage = on_stage or (lambda _: None)
    start = time.perf_counter()
    on_stage("isr")
    isr = run_isr(raw, bias, flat, defects, config.isr)
    return process_after_isr(isr, refcat, config, {"isr": time.perf_counter() - start},
                             on_stage)


def process_after_isr(isr: IsrResult, refcat: pd.DataFrame | None = None,
                      config: SingleVisitConfig | None = None,
                      timings: dict[str, float] | None = None,
                      on_stage: Callable[[str], None] | None = None) -> SingleVisitResult:
    """Characterization and calibration of an ISR result: :func:`process_exposure` after
    :func:`~apqa.pipeline.isr.run_isr`, for callers that let the raw and calibration frames go
    once ISR is done (they are a third of a unit's memory at its peak).

    ``timings`` (s per stage so far) are extended and returned in the result.
    """
    config = config or SingleVisitConfig()
    on_stage = on_stage or (lambda _: None)
    timings = dict(timings or {})
    start = time.perf_counter()
    on_stage("characterize")
    char = characterize(isr.exposure, config.characterize)
    timings["characterize"] = time.perf_counter() - start
    start = time.perf_counter()
    on_stage("calibrate")
    cal = calibrate(char.exposure, char.sources, refcat, config.calibrate)
    timings["calibrate"] = time.perf_counter() - start

    sources = _pixel_flags(cal.exposure, cal.sources, char.quality["psf_fwhm_px"])
    visit = isr.exposure.visit_info
    sources["visit"] = visit.visit if visit else 0
    sources["detector"] = visit.detector if visit else 0
    base = (sources["visit"].astype(np.int64) * 1000 + sources["detector"]) * 1_000_000
    sources["sourceId"] = base + np.arange(len(sources))
    sources = sources[SOURCE_COLUMNS].reset_index(drop=True)
    quality = {**isr.quality, **char.quality, **cal.quality}
    return SingleVisitResult(cal.exposure, sources, quality, timings)
