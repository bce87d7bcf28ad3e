"""Reading plain single-HDU FITS images as users bring them: header keywords, the header WCS,
and a variance plane from the pixels' sky noise (plus the sources' Poisson term from GAIN).

Split from :mod:`apqa.datamodel.fits_io`, which reads and writes apqa's own format and
dispatches plain files here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from astropy.io import fits

from apqa.datamodel.exposure import Exposure
from apqa.datamodel.header_wcs import HeaderWcs, parse_wcs
from apqa.datamodel.mask import Mask
from apqa.datamodel.obs_time import mjd_tai
from apqa.datamodel.photocalib import PhotoCalib
from apqa.datamodel.visitinfo import DetectorInfo, VisitInfo
from apqa.errors import InputError

if TYPE_CHECKING:
    from astropy.wcs import WCS


def read_wcs(header: fits.Header, source: str, required: bool, defer: bool = False
             ) -> WCS | HeaderWcs | None:
    """The celestial WCS of ``header`` (None without one, unless ``required``: then an
    :class:`~apqa.errors.InputError` naming ``source`` and the cards expected).

    With ``defer``, a header whose CTYPE cards name celestial axes gives a
    :class:`~apqa.datamodel.header_wcs.HeaderWcs`, parsed only when first used.
    """
    if defer:
        lazy = HeaderWcs(header, source)
        if lazy.looks_celestial():
            return lazy
    wcs = parse_wcs(header, source)
    if not wcs.has_celestial:
        if required:
            raise InputError(
                f"{source}: header has no celestial WCS (expected CTYPE1/CTYPE2 like "
                "'RA---TAN'/'DEC--TAN' with CRVAL, CRPIX and CD or CDELT cards)"
            )
        return None
    return wcs


def _number(header: fits.Header, keys: tuple[str, ...], source: str) -> float | None:
    """First of ``keys`` present in ``header`` as a number; non-numeric values are errors."""
    for key in keys:
        if key in header and header[key] not in (None, ""):
            try:
                value = float(header[key])
            except (TypeError, ValueError):
                raise InputError(
                    f"{source}: header keyword {key}={header[key]!r}: expected a number"
                ) from None
            if not np.isfinite(value):
                raise InputError(
                    f"{source}: header keyword {key}={value}: expected a finite number")
            return value
    return None


def _integer_id(header: fits.Header, keys: tuple[str, ...]) -> int:
    """First of ``keys`` that holds an integer id; names like 'S3-177' are not ids, so 0."""
    for key in keys:
        try:
            return int(header[key])
        except (KeyError, TypeError, ValueError):
            continue
    return 0


def band_from_filter(physical_filter: str) -> str:
    """Abstract band from a physical filter name ('g DECam SDSS c0001' -> 'g', 'HSC-I' -> 'i')."""
    name = physical_filter.strip()
    first = name.split()[0] if name else ""
    if len(first) == 1 and first.lower() in "ugrizy":
        return first.lower()
    if "-" in first and len(first.split("-")[-1]) == 1:  # HSC-I, HSC-R2 is left alone
        return first.split("-")[-1].lower()
    return first.lower() or "unknown"


def _mid_exposure_mjd_tai(header: fits.Header, exptime: float, source: str) -> float:
    scale = str(header.get("TIMESYS", "UTC")).strip().lower()
    if scale not in {"utc", "tai", "tt", "tdb", "ut1", "tcg", "tcb"}:
        scale = "utc"
    try:
        if "MJD-OBS" in header:
            return mjd_tai(float(header["MJD-OBS"]), scale, exptime / 2)
        if "DATE-OBS" in header:
            from astropy.time import Time

            value = str(header["DATE-OBS"])
            if "T" not in value and "TIME-OBS" in header:
                value = f"{value}T{header['TIME-OBS']}"
            start = Time(value, format="isot" if "T" in value else "iso", scale=scale)
            return mjd_tai(start.mjd, scale, exptime / 2)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{source}: header MJD-OBS/DATE-OBS: expected a date ({exc})") from None
    return float("nan")


def robust_sky(image: np.ndarray, valid: np.ndarray, crop: int = 1024) -> tuple[float, float]:
    """Sky level (median) and noise variance (from the MAD) of the pixels no source touches.

    Sources are found on a 5x5 box-smoothed image (4 sigma of the smoothed noise) and masked
    with a 9x9 margin: a plain clipped MAD over all pixels is inflated by the wings of stars and
    galaxies (6% in sigma on a field of 200 stars per 512^2). A central crop of at most
    ``crop`` x ``crop`` pixels is plenty for two numbers.
    """
    height, width = image.shape
    y0, x0 = max((height - crop) // 2, 0), max((width - crop) // 2, 0)
    data = image[y0:y0 + crop, x0:x0 + crop]
    usable = valid[y0:y0 + crop, x0:x0 + crop]
    if usable.sum() < 100:
        data, usable = image, valid
    median, mad = _median_and_mad(data[usable])
    # The smoothed image with unusable pixels at the current median, by linearity:
    # smooth(where(usable, data, m)) = smooth(data * usable) + m * (1 - smooth(usable)).
    all_usable = bool(usable.all())
    smooth_data = _box_mean(data if all_usable else np.where(usable, data, np.float32(0)), 2)
    fill = None if all_usable else 1.0 - _box_mean(usable.astype(np.float32), 2)
    previous = None
    for _ in range(3):
        if mad == 0:
            break
        threshold = median + 0.8 * mad
        above = (smooth_data > threshold if fill is None
                 else smooth_data + np.float32(median) * fill > threshold)
        sources = _grown(above.view(np.uint8), 4)
        if previous is not None and np.array_equal(sources, previous):
            break  # the same pixels again: the same two numbers
        values = data[usable & (sources == 0)]
        if values.size < 100:
            break
        median, mad = _median_and_mad(values)
        previous = sources
    return median, mad**2


# numpy only, not scipy.ndimage: apqa diff reads its images while scipy is being imported on
# the main thread, and a thread that imports scipy then can break that import (CPython < 3.13).

def _box_pass(padded: np.ndarray, shape: tuple[int, int], size: int,
              combine: np.ufunc) -> np.ndarray:
    """``combine`` (np.add, np.maximum) over the size x size box of each pixel of an image of
    ``shape`` padded by ``size // 2`` on every side: along rows, then along columns."""
    height, width = shape
    columns = padded[:, :width].copy()
    for i in range(1, size):
        combine(columns, padded[:, i:i + width], out=columns)
    out = columns[:height].copy()
    for i in range(1, size):
        combine(out, columns[i:i + height], out=out)
    return out


def _box_mean(image: np.ndarray, half: int) -> np.ndarray:
    """Mean over the (2 half + 1)^2 box around each pixel, edges mirrored (as
    ``scipy.ndimage.uniform_filter``), in float32."""
    size = 2 * half + 1
    padded = np.pad(np.asarray(image, np.float32), half, mode="symmetric")
    out = _box_pass(padded, image.shape, size, np.add)
    out *= np.float32(1.0 / size**2)
    return out


def _grown(flags: np.ndarray, half: int) -> np.ndarray:
    """Maximum of uint8 ``flags`` over the (2 half + 1)^2 box around each pixel (as
    ``scipy.ndimage.maximum_filter``: mirrored edges add nothing to a box maximum)."""
    return _box_pass(np.pad(flags, half), flags.shape, 2 * half + 1, np.maximum)


def _median_and_mad(values: np.ndarray) -> tuple[float, float]:
    """Median and 1.4826 x median absolute deviation of ``values`` (a scratch array that is
    reordered and overwritten: no copies)."""
    median = _median_inplace(values)
    np.subtract(values, np.float32(median), out=values)
    np.abs(values, out=values)
    return median, 1.4826 * _median_inplace(values)


def _median_inplace(values: np.ndarray) -> float:
    """``np.median`` of a scratch array, partitioned in place instead of copied."""
    half = values.size // 2
    values.partition(half)
    if values.size % 2:
        return float(values[half])
    # The lower middle value is the largest of the lower half: one selection, not two.
    return 0.5 * (float(values[:half].max()) + float(values[half]))


def calibration_from_units(header: fits.Header, source: str = "header") -> PhotoCalib | None:
    """The calibration of pixels already in flux units: ``BUNIT`` a spectral flux density
    (``nJy``, ``uJy``, ``Jy``...) per pixel, or per steradian with the pixel's solid angle in
    ``PIXAR_SR`` (JWST and HST drizzled images: ``MJy/sr``). None for counts (``ADU``, ``e-/s``)
    or without ``BUNIT``.

    Examples
    --------
    >>> header = fits.Header({"BUNIT": "MJy/sr", "PIXAR_SR": 2.25e-14})
    >>> round(calibration_from_units(header).calibration_mean, 3)  # nJy per pixel value
    22.5
    """
    import astropy.units as u

    text = str(header.get("BUNIT", "")).strip()
    if not text:
        return None
    unit = u.Unit(text, parse_strict="silent")
    if isinstance(unit, u.UnrecognizedUnit):
        return None
    if unit.is_equivalent(u.nJy):
        return PhotoCalib(float(unit.to(u.nJy)))
    if unit.is_equivalent(u.nJy / u.sr):
        solid_angle = _number(header, ("PIXAR_SR",), source)
        if solid_angle is None or not solid_angle > 0:
            raise InputError(f"{source}: BUNIT={text!r} is per steradian but PIXAR_SR (the "
                             "pixel's solid angle in sr) is missing or not positive")
        return PhotoCalib(float(unit.to(u.nJy / u.sr)) * solid_angle)
    return None


def _native_float32(data: np.ndarray) -> np.ndarray:
    """Native-endian float32 pixels of our own (changed in place by the reader): the array
    astropy read itself byte-swapped in place when it is big-endian float32, as FITS stores
    them (no second image-sized buffer), else a converted copy."""
    if data.dtype == np.dtype(">f4") and data.flags.writeable and data.flags.c_contiguous:
        return data.byteswap(inplace=True).view(np.float32)
    return np.array(data, dtype=np.float32)


def read_plain(hdul: fits.HDUList, source: str, require_wcs: bool, defer_wcs: bool = False
               ) -> Exposure:
    """The first 2-d image of ``hdul`` as an :class:`Exposure`: header keywords, NaN pixels as
    NO_DATA, SAT from SATURATE, and the variance from the sky noise plus GAIN's Poisson term
    (see :func:`apqa.datamodel.fits_io.read_exposure`; ``defer_wcs`` as in :func:`read_wcs`).
    """
    hdu = next((h for h in hdul if h.data is not None and np.ndim(h.data) == 2), None)
    if hdu is None:
        raise InputError(f"{source}: no 2-d image found in any HDU")
    header = hdul[0].header.copy()
    if hdu is not hdul[0]:
        header.update(hdu.header)  # image-HDU cards take precedence
    data = _native_float32(hdu.data)
    finite = np.isfinite(data)
    if not finite.any():
        raise InputError(f"{source}: image has no finite pixels (all NaN or inf)")
    wcs = read_wcs(header, source, require_wcs, defer_wcs)

    gain = _number(header, ("GAIN", "EGAIN"), source)
    read_noise = _number(header, ("RDNOISE", "READNOISE", "RDNOISEA"), source)
    saturate = _number(header, ("SATURATE", "SATURATA"), source)
    magzero = _number(header, ("MAGZERO", "PHOTZP", "MAGZPT"), source)
    exptime = _number(header, ("EXPTIME", "EXPOSURE"), source) or 0.0
    if gain is not None and gain <= 0:
        raise InputError(f"{source}: header keyword GAIN={gain}: expected > 0 (e-/ADU)")
    physical_filter = str(header.get("FILTER", "unknown")).strip() or "unknown"

    mask = Mask.zeros(data.shape)
    all_finite = bool(finite.all())
    image = data
    if not all_finite:
        mask.set("NO_DATA", ~finite)
        image[~finite] = 0.0
    valid = finite
    if saturate is not None:
        saturated = image >= saturate
        mask.set("SAT", saturated)
        valid = finite & ~saturated
    sky_level, sky_var = robust_sky(image, valid)
    # Sky noise from the pixels (right for sky-subtracted images too), source Poisson from gain.
    if gain is None:
        variance = np.full(data.shape, sky_var, dtype=np.float32)
    else:  # built in place: sky variance + the sources' counts above the sky / gain
        variance = image - np.float32(sky_level)
        np.clip(variance, 0, None, out=variance)
        variance *= np.float32(1.0 / gain)
        variance += np.float32(sky_var)
    if not all_finite:
        variance[~finite] = np.inf

    metadata = fits.Header()
    metadata["VARSRC"] = ("pixels+gain" if gain is not None else "pixels", "variance model")
    metadata["SRCFILE"] = (Path(source).name, "file the exposure was read from")
    visit_info = VisitInfo(
        visit=_integer_id(header, ("VISIT", "EXPNUM", "EXPID")),
        detector=_integer_id(header, ("CCDNUM", "DETECTOR")),
        band=band_from_filter(physical_filter),
        physical_filter=physical_filter,
        mjd=_mid_exposure_mjd_tai(header, exptime, source),
        exposure_time=exptime,
        airmass=_number(header, ("AIRMASS",), source) or float("nan"),
        seeing=float("nan"),
    )
    detector_info = DetectorInfo(
        gain=gain if gain is not None else float("nan"),
        read_noise=read_noise if read_noise is not None else float("nan"),
        saturation=saturate if saturate is not None else float("inf"),
    )
    return Exposure(
        image=image, variance=variance, mask=mask, wcs=wcs,
        photo_calib=(PhotoCalib.from_zero_point(magzero) if magzero is not None
                     else calibration_from_units(header, source)),
        visit_info=visit_info, detector_info=detector_info, metadata=metadata,
    )
