"""Apparent star positions at an observation epoch: proper motion and annual parallax."""

from __future__ import annotations

import numpy as np
from astropy.coordinates import get_body_barycentric
from astropy.time import Time

MAS_PER_DEG = 3.6e6
DAYS_PER_JULIAN_YEAR = 365.25


def earth_barycentric_au(mjd_tai: float) -> np.ndarray:
    """Barycentric position of the Earth (AU, ICRS axes) at ``mjd_tai``."""
    pos = get_body_barycentric("earth", Time(mjd_tai, format="mjd", scale="tai"))
    return pos.xyz.to_value("AU")


def apparent_positions(
    ra: np.ndarray,
    dec: np.ndarray,
    pmra: np.ndarray,
    pmdec: np.ndarray,
    parallax: np.ndarray,
    ref_epoch_mjd: float,
    mjd_tai: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (degrees) seen from the geocentre at ``mjd_tai``.

    Parameters
    ----------
    ra, dec
        Catalogue positions (degrees) at the reference epoch.
    pmra, pmdec
        Proper motion (mas/yr); ``pmra`` is mu_alpha* = mu_alpha cos(dec), as in Gaia.
    parallax
        mas.
    ref_epoch_mjd, mjd_tai
        Reference and observation epochs (MJD).
    """
    dt = (mjd_tai - ref_epoch_mjd) / DAYS_PER_JULIAN_YEAR
    ra_r, dec_r = np.deg2rad(ra), np.deg2rad(dec)
    x, y, z = earth_barycentric_au(mjd_tai)
    # Parallax factors: the star appears displaced away from the observer's barycentric offset.
    d_ra_star = parallax * (x * np.sin(ra_r) - y * np.cos(ra_r))
    d_dec = parallax * (x * np.cos(ra_r) * np.sin(dec_r) + y * np.sin(ra_r) * np.sin(dec_r)
                        - z * np.cos(dec_r))
    ra_out = ra + (pmra * dt + d_ra_star) / MAS_PER_DEG / np.cos(dec_r)
    dec_out = dec + (pmdec * dt + d_dec) / MAS_PER_DEG
    return ra_out, dec_out
