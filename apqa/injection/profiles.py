"""Extended fakes (Sersic galaxies, trails, postage stamps): GalSim profiles convolved with the
exposure's PSF at their position, through the local WCS Jacobian, drawn into small stamps.

Each profile is built in sky coordinates (arcsec, +u west, +v north), mapped to pixel
coordinates by the local Jacobian of the WCS at the fake's position and shifted to its
sub-pixel position. GalSim gives its Fourier transform on the stamp's frequency grid; that is
multiplied by the DFT of the PSF image at the position (the effective, pixel-convolved PSF) and
transformed back: the same sampled convolution as GalSim's ``drawImage(method="no_pixel")``
against an ``InterpolatedImage`` of the PSF, without GalSim's per-object FFT sizing. The DC term
is the flux times the PSF's sum (1), so every stamp holds exactly the fake's flux (light beyond
the stamp wraps onto its far edge instead of being lost). The full image is never a target.

Sersic profiles are truncated at ``trunc`` half-light radii (the simulator's galaxies end near
4) and their index is rounded to ``n_step`` so that GalSim's per-index tables stay cached.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import galsim
import numpy as np
import scipy.fft as sfft
from astropy.io import fits
from astropy.wcs import WCS

#: One GSParams object for every profile: GalSim caches Sersic tables per (n, trunc, gsparams).
GSPARAMS = galsim.GSParams()
#: Width (arcsec) of the line a trail is drawn as: far below any PSF.
_TRAIL_WIDTH = 1e-3


class ProfileError(Exception):
    """A profile that cannot be built (bad shape values, unreadable stamp)."""


@lru_cache(maxsize=64)
def read_stamp(path: str) -> tuple[np.ndarray, float | None]:
    """Pixels of a postage stamp (first 2-d HDU) and its pixel scale in arcsec (``PIXSCALE``
    or the header WCS; ``None`` when absent: the exposure's pixel scale is then used)."""
    try:
        with fits.open(path, memmap=False) as hdul:
            hdu = next((h for h in hdul if h.data is not None and np.ndim(h.data) == 2), None)
            if hdu is None:
                raise ProfileError(f"{path}: no 2-d image")
            data = np.asarray(hdu.data, np.float64)
            header = hdu.header
    except OSError as exc:
        raise ProfileError(f"{path}: not a readable FITS file ({exc})") from None
    if not np.isfinite(data).all() or data.sum() <= 0:
        raise ProfileError(f"{path}: pixels must be finite with a positive sum")
    if "PIXSCALE" in header:
        return data, float(header["PIXSCALE"])
    wcs = WCS(header, naxis=2)
    if wcs.has_celestial:
        return data, float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix)))) * 3600.0
    return data, None


def world_profile(kind: str, shape: dict, flux: float, pixel_scale: float, trunc: float,
                  n_step: float) -> tuple[galsim.GSObject, float]:
    """The fake's profile in sky coordinates with total ``flux``, and its radius in arcsec.

    ``shape`` holds the catalog's shape columns for the kind.
    """
    if kind == "sersic":
        n = float(np.clip(np.round(shape["n"] / n_step) * n_step, 0.3, 6.2))
        hlr, q = float(shape["half_light_radius"]), float(shape["q"])
        # Built at unit radius and dilated: GalSim's table key (n, trunc / r0) stays the same.
        profile = galsim.Sersic(n=n, half_light_radius=1.0, trunc=trunc, flux=flux,
                                gsparams=GSPARAMS).dilate(hlr)
        profile = profile.shear(q=q, beta=float(shape["beta"]) * galsim.degrees)
        return profile, trunc * hlr / np.sqrt(q)
    if kind == "trail":
        length = float(shape["trail_length"])
        if length <= _TRAIL_WIDTH:
            return galsim.DeltaFunction(flux=flux, gsparams=GSPARAMS), 0.0
        box = galsim.Box(width=length, height=_TRAIL_WIDTH, flux=flux, gsparams=GSPARAMS)
        return box.rotate(float(shape["trail_angle"]) * galsim.degrees), length / 2
    if kind == "stamp":
        data, scale = read_stamp(str(shape["stamp"]))
        scale = scale or pixel_scale
        image = galsim.ImageD(data, scale=scale)
        profile = galsim.InterpolatedImage(image, flux=flux, gsparams=GSPARAMS)
        return profile, 0.5 * np.hypot(*data.shape) * scale
    raise ProfileError(f"unknown kind {kind!r}")


def stamp_size(radius_px: float, kernel_size: int) -> int:
    """Even FFT-friendly stamp side holding a profile of ``radius_px`` convolved with the PSF."""
    size = sfft.next_fast_len(2 * int(np.ceil(radius_px + kernel_size / 2 + 2)), real=True)
    return size + size % 2


def draw_stamp(profile: galsim.GSObject, jacobian: np.ndarray, kernel: np.ndarray,
               offset: tuple[float, float], size: int) -> np.ndarray:
    """``profile`` (sky coordinates) seen through ``jacobian`` (arcsec per pixel, d(u, v) /
    d(x, y)), shifted by ``offset`` pixels and convolved with the centred PSF ``kernel``.

    Returns a ``size`` x ``size`` stamp whose pixel ``(size // 2, size // 2)`` is the pixel the
    offset is measured from; it sums to the profile's flux.
    """
    local = galsim.JacobianWCS(jacobian[0, 0], jacobian[0, 1], jacobian[1, 0], jacobian[1, 1])
    in_pixels = local.toImage(profile).shift(*offset)
    dk = 2.0 * np.pi / size
    kimage = galsim.ImageCD(galsim.BoundsI(0, size // 2, -size // 2, size // 2 - 1), scale=dk)
    in_pixels.drawKImage(image=kimage, recenter=False)
    spectrum = np.fft.ifftshift(kimage.array, axes=0)  # rows in FFT order, columns 0..size/2
    k0 = kernel.shape[0]
    padded = np.zeros((size, size))
    padded[:k0, :k0] = kernel
    padded = np.roll(padded, (-(k0 // 2), -(k0 // 2)), axis=(0, 1))  # centre at (0, 0)
    product = spectrum * sfft.rfft2(padded, workers=1)
    stamp = sfft.irfft2(product, s=(size, size), workers=1)
    return np.fft.fftshift(stamp)


def shape_values(row: dict, kind: str) -> dict:
    """The shape columns a kind needs, from a catalog row (a mapping)."""
    names = {"sersic": ("n", "half_light_radius", "q", "beta"),
             "trail": ("trail_length", "trail_angle"), "stamp": ("stamp",)}[kind]
    values = {name: row.get(name) for name in names}
    if kind == "stamp":
        if not isinstance(values["stamp"], (str, Path)) or not Path(values["stamp"]).is_file():
            raise ProfileError(f"stamp {values['stamp']!r} is not a file")
        return values
    bad = [k for k, v in values.items() if v is None or not np.isfinite(float(v))]
    if bad:
        raise ProfileError(f"non-finite {bad}")
    if kind == "sersic" and not (0.3 <= values["n"] <= 6.2 and values["half_light_radius"] > 0
                                 and 0 < values["q"] <= 1):
        raise ProfileError("Sersic n outside [0.3, 6.2], half_light_radius <= 0 or q not in "
                           "(0, 1]")
    if kind == "trail" and values["trail_length"] < 0:
        raise ProfileError("trail_length < 0")
    return values
