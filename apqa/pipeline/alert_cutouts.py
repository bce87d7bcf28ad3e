"""Alert cutouts: small FITS files (image, mask, variance) with the exposure's WCS, in nJy.

A cutout has astropy ``CCDData``'s layout, so ``CCDData.read(BytesIO(cutout))`` gives the image
with its unit, WCS, boolean mask and variance: the primary HDU holds the image (``BUNIT = 'nJy'``)
and the WCS shifted to the cutout (``CRPIX`` minus the cutout's origin, SIP terms unchanged),
``MASK`` the int32 mask bits (plane names in ``MP_*`` cards, like apqa exposures) and ``UNCERT``
the variance (``UTYPE = 'VarianceUncertainty'``). Pixels beyond the exposure are NaN with the
NO_DATA bit set.

Writing thousands of cutouts a second through astropy would take most of the alert budget, so
each exposure's headers are rendered once by astropy and each cutout only rewrites the four
cards that change (``NAXIS1``, ``NAXIS2``, ``CRPIX1``, ``CRPIX2``) before appending the
big-endian pixels.
"""

from __future__ import annotations

import numpy as np
from astropy.io import fits

from apqa.datamodel import Exposure
from apqa.errors import InputError

BLOCK = 2880
CARD = 80


def _card(key: str, value: int | float) -> bytes:
    text = f"{key:<8}= {value:>20d}" if isinstance(value, int) else f"{key:<8}= {value:>20.12E}"
    return text.ljust(CARD).encode("ascii")


def _pad(data: bytes, fill: bytes = b"\0") -> bytes:
    extra = -len(data) % BLOCK
    return data + fill * extra if extra else data


class _Header:
    """A rendered header and the byte offsets of the cards each cutout rewrites."""

    def __init__(self, header: fits.Header, keys: tuple[str, ...]) -> None:
        self.text = header.tostring().encode("ascii")
        self.offsets = {}
        for key in keys:
            prefix = f"{key:<8}=".encode("ascii")
            at = next((i for i in range(0, len(self.text), CARD)
                       if self.text[i:i + 9] == prefix), None)
            if at is None:
                raise InputError(f"cutout header: card {key} missing")
            self.offsets[key] = at

    def render(self, values: dict[str, int | float]) -> bytes:
        out = bytearray(self.text)
        for key, value in values.items():
            at = self.offsets[key]
            out[at:at + CARD] = _card(key, value)
        return bytes(out)


class CutoutMaker:
    """Makes FITS cutouts of one exposure.

    Parameters
    ----------
    exposure
        Needs a WCS and a photometric calibration (cutouts are in nJy).
    wcs_header
        ``exposure.wcs.to_header(relax=True)`` when the caller already has it (rendering it
        is the costly part of making a maker).

    Examples
    --------
    >>> maker = CutoutMaker(difference)                  # doctest: +SKIP
    >>> data = maker.cutout(x=812.3, y=40.9, size=30)     # doctest: +SKIP
    >>> CCDData.read(io.BytesIO(data)).shape              # doctest: +SKIP
    (30, 30)
    """

    def __init__(self, exposure: Exposure, wcs_header: fits.Header | None = None) -> None:
        if exposure.wcs is None or exposure.photo_calib is None:
            raise InputError("alert cutouts: the exposure needs a WCS and a photometric "
                             "calibration")
        self.exposure = exposure
        self.scale = np.float32(exposure.photo_calib.calibration_mean)
        self.crpix = exposure.wcs.wcs.crpix.astype(float).copy()
        self.no_data = np.int32(1 << exposure.mask.planes["NO_DATA"]) if (
            "NO_DATA" in exposure.mask.planes) else np.int32(0)
        if wcs_header is None:
            wcs_header = exposure.wcs.to_header(relax=True)
        primary = fits.PrimaryHDU(np.zeros((1, 1), np.float32), header=wcs_header.copy())
        primary.header["BUNIT"] = "nJy"
        primary.header["EXTEND"] = True
        if exposure.visit_info is not None:
            info = exposure.visit_info
            primary.header["VISIT"] = info.visit
            primary.header["DETECTOR"] = info.detector
            primary.header["BAND"] = info.band
            primary.header["MJD-AVG"] = (info.mjd, "exposure midpoint, MJD (TAI)")
        mask_hdu = fits.ImageHDU(np.zeros((1, 1), np.int32), name="MASK")
        exposure.mask.to_header(mask_hdu.header)
        var_hdu = fits.ImageHDU(np.zeros((1, 1), np.float32), name="UNCERT")
        var_hdu.header["UTYPE"] = "VarianceUncertainty"
        shape_keys = ("NAXIS1", "NAXIS2")
        self._primary = _Header(primary.header, (*shape_keys, "CRPIX1", "CRPIX2"))
        self._mask = _Header(mask_hdu.header, shape_keys)
        self._var = _Header(var_hdu.header, shape_keys)

    def _planes(self, x0: int, y0: int, size: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        exp = self.exposure
        h, w = exp.shape
        if 0 <= x0 and 0 <= y0 and x0 + size <= w and y0 + size <= h:
            sl = (slice(y0, y0 + size), slice(x0, x0 + size))
            return exp.image[sl], exp.mask.array[sl], exp.variance[sl]
        image = np.full((size, size), np.nan, np.float32)
        var = np.full((size, size), np.nan, np.float32)
        mask = np.full((size, size), self.no_data, np.int32)
        ya, yb = max(y0, 0), min(y0 + size, h)
        xa, xb = max(x0, 0), min(x0 + size, w)
        if ya < yb and xa < xb:
            dst = (slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))
            image[dst] = exp.image[ya:yb, xa:xb]
            mask[dst] = exp.mask.array[ya:yb, xa:xb]
            var[dst] = exp.variance[ya:yb, xa:xb]
        return image, mask, var

    def cutout(self, x: float, y: float, size: int) -> bytes:
        """FITS bytes of a ``size`` x ``size`` cutout centred on pixel (x, y) (0-based)."""
        x0 = int(np.floor(x + 0.5)) - size // 2
        y0 = int(np.floor(y + 0.5)) - size // 2
        image, mask, var = self._planes(x0, y0, size)
        shape = {"NAXIS1": size, "NAXIS2": size}
        parts = [
            self._primary.render({**shape, "CRPIX1": self.crpix[0] - x0,
                                  "CRPIX2": self.crpix[1] - y0}),
            _pad((image * self.scale).astype(">f4").tobytes()),
            self._mask.render(shape),
            _pad(mask.astype(">i4").tobytes()),
            self._var.render(shape),
            _pad((var * (self.scale * self.scale)).astype(">f4").tobytes()),
        ]
        return b"".join(parts)
