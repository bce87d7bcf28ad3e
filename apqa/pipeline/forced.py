"""Forced PSF photometry at DiaObject positions: the APDB DiaForcedSource rows of a visit.

Every DiaObject with at least ``min_dia_sources`` DiaSources (Rubin: 2) whose position falls on
the detector is measured with a linear PSF fit at its fixed position
(:func:`apqa.pipeline.photometry.psf_flux`): on the difference image with the difference-image
PSF (``psfFlux``) and on the science image with its PSF (``scienceFlux``), aperture corrected
like DiaSource fluxes (the science exposure's ``APCORR``) and calibrated to nJy.

Examples
--------
>>> forced = forced_photometry(result.dia_objects, difference, science)  # doctest: +SKIP
>>> list(forced.columns[:3])                                              # doctest: +SKIP
['diaForcedSourceId', 'diaObjectId', 'ra']
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from astropy.time import Time

from apqa.datamodel import Exposure
from apqa.datamodel.apdb_schema import conform, empty_table
from apqa.errors import InputError
from apqa.pipeline.photometry import psf_flux

#: Mask planes whose pixels are left out of the PSF fit (as in DiaSource measurement).
UNUSABLE_PLANES = ("NO_DATA", "BAD", "SAT", "CR")


class _UsableAt:
    """``usable[wy, wx]`` worked out at the indexed pixels only: a handful of PSF stamps need
    no full-image pass (and a lazily read exposure is then read only there)."""

    def __init__(self, exposure: Exposure) -> None:
        self.mask = exposure.mask.array
        self.bits = exposure.mask.bitmask(list(UNUSABLE_PLANES))
        self.variance = exposure.variance

    def __getitem__(self, index: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        return ((self.mask[index] & self.bits) == 0) & np.isfinite(self.variance[index])


def _fluxes(exposure: Exposure, x: np.ndarray, y: np.ndarray, apcorr: float
            ) -> tuple[np.ndarray, np.ndarray]:
    flux, err, _, _ = psf_flux(exposure.image, exposure.variance, _UsableAt(exposure),
                               exposure.psf, x, y)
    calib = exposure.photo_calib
    return calib.to_njy(flux * apcorr), calib.to_njy(err * apcorr)


def _check(exposure: Exposure, name: str) -> None:
    for attr in ("psf", "wcs", "photo_calib"):
        if getattr(exposure, attr) is None:
            raise InputError(f"forced photometry: the {name} exposure has no {attr}")


def forced_photometry(dia_objects: pd.DataFrame, difference: Exposure, science: Exposure,
                      visit: int | None = None, detector: int | None = None, *,
                      min_dia_sources: int = 2, processed_mjd: float | None = None
                      ) -> pd.DataFrame:
    """DiaForcedSource rows for one visit-detector.

    Parameters
    ----------
    dia_objects
        DiaObjects (apdb.yaml columns ``diaObjectId``, ``ra``, ``dec``, ``nDiaSources``), e.g.
        the association's updated objects plus the unassociated ones of the footprint.
    difference, science
        The visit's difference and science exposures (same pixel grid, each with PSF, WCS and
        photometric calibration).
    visit, detector
        Default to the difference exposure's visit info.
    min_dia_sources
        Objects with fewer DiaSources are not measured.
    processed_mjd
        ``timeProcessedMjdTai``; defaults to now.

    Returns
    -------
    DataFrame
        Conforming to apdb.yaml's DiaForcedSource; ``diaForcedSourceId`` is
        ``visit * 10**8 + detector * 10**5 + row``, like DiaSource ids.
    """
    _check(difference, "difference")
    _check(science, "science")
    info = difference.visit_info
    if info is None:
        raise InputError("forced photometry: the difference exposure has no visit info "
                         "(needed for band and midpointMjdTai)")
    visit = int(info.visit if visit is None else visit)
    detector = int(info.detector if detector is None else detector)
    for col in ("diaObjectId", "ra", "dec", "nDiaSources"):
        if col not in dia_objects.columns:
            raise InputError(f"forced photometry: dia_objects lacks column {col!r}")
    objects = dia_objects[dia_objects["nDiaSources"].to_numpy() >= min_dia_sources]
    ra = objects["ra"].to_numpy(np.float64)
    dec = objects["dec"].to_numpy(np.float64)
    x, y = difference.sky_to_pixel(ra, dec) if len(objects) else (np.zeros(0), np.zeros(0))
    on = ((x >= -0.5) & (x <= difference.width - 0.5)
          & (y >= -0.5) & (y <= difference.height - 0.5))
    objects, x, y = objects[on], x[on], y[on]
    n = len(objects)
    if n >= 100_000:
        raise InputError(f"forced photometry: {n} objects on visit {visit} detector "
                         f"{detector}; ids allow at most 99999")
    table = empty_table("DiaForcedSource", n)
    apcorr = float(science.metadata.get("APCORR", 1.0))
    table["psfFlux"], table["psfFluxErr"] = _fluxes(difference, x, y, apcorr)
    table["scienceFlux"], table["scienceFluxErr"] = _fluxes(science, x, y, apcorr)
    table["diaForcedSourceId"] = (np.int64(visit) * 100_000_000 + np.int64(detector) * 100_000
                                  + np.arange(n))
    table["diaObjectId"] = objects["diaObjectId"].to_numpy(np.int64)
    table["ra"], table["dec"] = objects["ra"].to_numpy(), objects["dec"].to_numpy()
    table["visit"], table["detector"] = visit, detector
    table["band"] = info.band
    table["midpointMjdTai"] = info.mjd
    table["timeProcessedMjdTai"] = (Time.now().tai.mjd if processed_mjd is None
                                    else processed_mjd)
    return conform(table, "DiaForcedSource", source="forced photometry")
