"""Simulated camera geometry: focal-plane layout and TAN-SIP WCS with radial optical distortion.

Each detector's WCS is a gnomonic (TAN) projection about the boresight, so ``CRPIX`` is the
boresight's position in that detector's pixel frame (usually outside the detector). The optical
distortion is radial about the boresight, ``r' = r (1 + k r^2)``, which is exactly the third-order
SIP polynomial ``A_3_0 = A_1_2 = B_2_1 = B_0_3 = k``: the truth WCS is represented without
approximation. Inverse coefficients (AP/BP) are fitted for readers that use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from astropy.wcs import WCS


@dataclass(frozen=True)
class CameraSpec:
    """A camera: identical detectors on a regular focal-plane grid."""

    name: str
    width: int
    height: int
    pixel_scale: float  # arcsec per pixel
    gain: float  # e-/ADU
    read_noise: float  # e-
    full_well: float  # e-
    bias_level: float  # ADU
    pixel_size_um: float = 15.0
    gap: int = 200  # pixels between detectors
    columns: int = 7
    distortion_at_1deg: float = 12.0  # radial displacement in pixels at 1 degree

    @property
    def distortion_k(self) -> float:
        """SIP radial coefficient k (pixels^-2)."""
        r = 3600.0 / self.pixel_scale
        return self.distortion_at_1deg / r**3

    def detector_offset(self, detector: int) -> tuple[float, float]:
        """Focal-plane offset (pixels) of detector ``detector``'s centre from the boresight.

        Detectors fill a grid of ``columns`` columns row by row, from the central column
        outwards, starting just above the boresight and alternating above/below, so that even
        detector 1 is off-axis and sees optical distortion.
        """
        slot = detector - 1
        c = slot % self.columns
        col = (c + 1) // 2 * (1 if c % 2 else -1)
        row_index = slot // self.columns
        row = (row_index // 2 + 0.5) * (1 if row_index % 2 == 0 else -1)
        return col * (self.width + self.gap), row * (self.height + self.gap)

    def area_deg2(self) -> float:
        """Sky area of one detector in deg^2."""
        return self.width * self.height * (self.pixel_scale / 3600.0) ** 2


@lru_cache(maxsize=64)
def _sip_inverse(k: float, radius: float, order: int = 5) -> dict[str, float]:
    """Least-squares AP/BP coefficients inverting the radial distortion within ``radius``.

    Cached: every visit of a detector shares them (callers must not mutate the result).
    """
    grid = np.linspace(-radius, radius, 41)
    uu, vv = np.meshgrid(grid, grid)
    u, v = uu.ravel(), vv.ravel()
    r2 = u * u + v * v
    # Forward: U = u (1 + k r^2); we want u - U as a polynomial of (U, V).
    big_u, big_v = u * (1 + k * r2), v * (1 + k * r2)
    terms = [(p, q) for p in range(order + 1) for q in range(order + 1 - p) if p + q >= 1]
    design = np.stack([big_u**p * big_v**q for p, q in terms], axis=1)
    scale = np.abs(design).max(axis=0)
    ca, *_ = np.linalg.lstsq(design / scale, u - big_u, rcond=None)
    cb, *_ = np.linalg.lstsq(design / scale, v - big_v, rcond=None)
    out = {}
    for (p, q), a, b in zip(terms, ca / scale, cb / scale, strict=True):
        out[f"AP_{p}_{q}"] = float(a)
        out[f"BP_{p}_{q}"] = float(b)
    return out


def detector_wcs(
    camera: CameraSpec,
    detector: int,
    boresight_ra: float,
    boresight_dec: float,
    rotation_deg: float = 0.0,
) -> WCS:
    """The TAN-SIP WCS of one detector for a pointing.

    Parameters
    ----------
    camera
        Camera geometry.
    detector
        1-based detector number.
    boresight_ra, boresight_dec
        Pointing in degrees.
    rotation_deg
        Sky rotation of the focal plane (degrees, east of north).
    """
    off_x, off_y = camera.detector_offset(detector)
    # Boresight in this detector's 1-based FITS pixel frame.
    crpix1 = (camera.width + 1) / 2 - off_x
    crpix2 = (camera.height + 1) / 2 - off_y
    scale = camera.pixel_scale / 3600.0
    theta = np.deg2rad(rotation_deg)
    k = camera.distortion_k
    corner = np.hypot(abs(off_x) + camera.width / 2, abs(off_y) + camera.height / 2)
    header = {
        "NAXIS": 2, "NAXIS1": camera.width, "NAXIS2": camera.height,
        "CTYPE1": "RA---TAN-SIP", "CTYPE2": "DEC--TAN-SIP",
        "CUNIT1": "deg", "CUNIT2": "deg",
        "CRVAL1": boresight_ra, "CRVAL2": boresight_dec,
        "CRPIX1": crpix1, "CRPIX2": crpix2,
        "CD1_1": -scale * np.cos(theta), "CD1_2": scale * np.sin(theta),
        "CD2_1": scale * np.sin(theta), "CD2_2": scale * np.cos(theta),
        "A_ORDER": 3, "B_ORDER": 3, "AP_ORDER": 5, "BP_ORDER": 5,
        "A_3_0": k, "A_1_2": k, "B_2_1": k, "B_0_3": k,
        "RADESYS": "ICRS",
    }
    header.update(_sip_inverse(k, corner * 1.05))
    return WCS(header)
