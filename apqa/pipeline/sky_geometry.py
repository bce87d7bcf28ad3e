"""Angles and scales on the sky at pixel positions, through an exposure's WCS."""

from __future__ import annotations

import numpy as np

from apqa.datamodel import Exposure


def position_angle(exposure: Exposure, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray,
                   y1: np.ndarray) -> np.ndarray:
    """Position angle (deg, north through east) of the direction from (x0, y0) to (x1, y1)."""
    ra0, dec0 = (np.deg2rad(v) for v in exposure.pixel_to_sky(x0, y0))
    ra1, dec1 = (np.deg2rad(v) for v in exposure.pixel_to_sky(x1, y1))
    dra = ra1 - ra0
    pa = np.arctan2(np.sin(dra) * np.cos(dec1),
                    np.cos(dec0) * np.sin(dec1) - np.sin(dec0) * np.cos(dec1) * np.cos(dra))
    return np.rad2deg(pa) % 360.0


def local_pixel_scale(exposure: Exposure, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Local pixel scale (arcsec/px, geometric mean of the axes) from the WCS at each point."""
    ra, dec = exposure.pixel_to_sky(x, y)
    ra1, dec1 = exposure.pixel_to_sky(x + 1.0, y)
    ra2, dec2 = exposure.pixel_to_sky(x, y + 1.0)
    cosd = np.cos(np.deg2rad(dec))
    sx = np.hypot((ra1 - ra) * cosd, dec1 - dec)
    sy = np.hypot((ra2 - ra) * cosd, dec2 - dec)
    return 3600.0 * np.sqrt(sx * sy)


def footprint_cone(exposure: Exposure, margin_arcsec: float = 0.0) -> tuple[float, float, float]:
    """(ra, dec, radius) in degrees of a cone holding the whole exposure."""
    height, width = exposure.shape
    xs = np.array([(width - 1) / 2, 0, width - 1, 0, width - 1], float)
    ys = np.array([(height - 1) / 2, 0, 0, height - 1, height - 1], float)
    ra, dec = exposure.pixel_to_sky(xs, ys)
    c_ra, c_dec = np.deg2rad(ra[0]), np.deg2rad(dec[0])
    r_ra, r_dec = np.deg2rad(ra[1:]), np.deg2rad(dec[1:])
    cos_sep = np.sin(c_dec) * np.sin(r_dec) + np.cos(c_dec) * np.cos(r_dec) * np.cos(r_ra - c_ra)
    radius = float(np.rad2deg(np.arccos(np.clip(cos_sep, -1, 1))).max())
    return float(ra[0]), float(dec[0]), radius + margin_arcsec / 3600.0
