"""HEALPix pixel ids for the APDB's spatial index, and sky cones as ranges of those ids.

Every DiaObject and DiaSource row carries ``pixelId``: its nested HEALPix pixel at order
:data:`PIXEL_ORDER` (nside 65536, pixels about 3.2 arcsec across). In the nested scheme the
children of a coarse pixel form one contiguous range of fine ids, so a cone is covered by a few
``pixelId BETWEEN lo AND hi`` conditions that the pixelId index answers; rows are then cut to the
exact cone.

Examples
--------
>>> ranges = cone_ranges(150.0, 2.0, 0.15)
>>> all(lo < hi for lo, hi in ranges)
True
>>> pid = int(pixel_ids([150.0], [2.0])[0])
>>> any(lo <= pid < hi for lo, hi in ranges)
True
"""

from __future__ import annotations

import astropy.units as u
import numpy as np
from astropy_healpix import HEALPix

#: HEALPix order (nside = 2**order) of the ``pixelId`` column.
PIXEL_ORDER = 16
#: What the metadata table records about the pixelization; checked when an APDB is opened.
PIXELIZATION = f"healpix-nested-order{PIXEL_ORDER}"


def pixel_ids(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Nested HEALPix ids at :data:`PIXEL_ORDER` of positions in degrees (int64)."""
    hp = HEALPix(nside=2**PIXEL_ORDER, order="nested")
    ra = np.asarray(ra, np.float64)
    if ra.size == 0:
        return np.zeros(0, np.int64)
    return hp.lonlat_to_healpix(ra * u.deg, np.asarray(dec, np.float64) * u.deg).astype(np.int64)


def cone_ranges(ra: float, dec: float, radius: float) -> list[tuple[int, int]]:
    """Half-open ``[lo, hi)`` ranges of ``pixelId`` that cover a cone (degrees).

    The cone is searched at the coarsest order whose pixels are at least a quarter of the radius,
    grown by 1.1 coarse pixels because the search keeps pixels by their centres (that margin
    catches every pixel touching the cone, verified by sampling the cone's edge); the
    coarse pixels are then expanded to fine-id ranges and adjacent ranges merged.
    """
    if not (np.isfinite(ra) and np.isfinite(dec) and np.isfinite(radius) and radius > 0):
        raise ValueError(f"cone ({ra}, {dec}, {radius}): expected finite values, radius > 0")
    order = PIXEL_ORDER
    while order > 0 and HEALPix(nside=2**order).pixel_resolution.to_value(u.deg) < radius / 4:
        order -= 1
    coarse = HEALPix(nside=2**order, order="nested")
    grown = min(radius + 1.1 * coarse.pixel_resolution.to_value(u.deg), 180.0)
    pixels = np.sort(coarse.cone_search_lonlat(ra * u.deg, dec * u.deg, grown * u.deg))
    shift = 2 * (PIXEL_ORDER - order)
    ranges: list[tuple[int, int]] = []
    for p in pixels.tolist():
        lo, hi = p << shift, (p + 1) << shift
        if ranges and ranges[-1][1] == lo:
            ranges[-1] = (ranges[-1][0], hi)
        else:
            ranges.append((lo, hi))
    return ranges


def angular_separation(ra1: np.ndarray, dec1: np.ndarray, ra2: float | np.ndarray,
                       dec2: float | np.ndarray) -> np.ndarray:
    """Great-circle separation in degrees (haversine, accurate at small angles)."""
    r1, d1, r2, d2 = (np.radians(np.asarray(v, np.float64)) for v in (ra1, dec1, ra2, dec2))
    h = (np.sin((d2 - d1) / 2) ** 2
         + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2)
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0))))
