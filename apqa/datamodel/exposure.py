"""The Exposure: pixels (image, mask, variance) plus everything needed to interpret them."""

from __future__ import annotations

import copy as _copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from astropy.io import fits

from apqa.datamodel.header_wcs import HeaderWcs
from apqa.datamodel.mask import Mask, stored_pixels
from apqa.datamodel.photocalib import PhotoCalib
from apqa.datamodel.psf import Psf
from apqa.datamodel.visitinfo import DetectorInfo, VisitInfo
from apqa.errors import InputError

if TYPE_CHECKING:
    from astropy.wcs import WCS


@dataclass
class Exposure:
    """An image with its variance, mask, PSF, WCS, photometric calibration and visit info.

    Parameters
    ----------
    image
        2-d pixel values (stored as ``float32``).
    variance
        Per-pixel variance in image units squared, same shape.
    mask
        :class:`~apqa.datamodel.mask.Mask` of the same shape (empty when omitted).
    psf, wcs, photo_calib, visit_info, detector_info
        Optional descriptions; ``wcs`` must be celestial when given (an astropy WCS, or a
        :class:`~apqa.datamodel.header_wcs.HeaderWcs` that stands in for one until used).
    metadata
        Extra FITS header cards carried through I/O.

    Examples
    --------
    >>> import numpy as np
    >>> exp = Exposure(np.zeros((8, 16)), np.ones((8, 16)))
    >>> exp.shape, exp.image.dtype.name, exp.mask.planes["SAT"]
    ((8, 16), 'float32', 1)
    """

    image: np.ndarray
    variance: np.ndarray
    mask: Mask | None = None
    psf: Psf | None = None
    wcs: WCS | HeaderWcs | None = None
    photo_calib: PhotoCalib | None = None
    visit_info: VisitInfo | None = None
    detector_info: DetectorInfo | None = None
    metadata: fits.Header = field(default_factory=fits.Header)

    def __post_init__(self) -> None:
        self.image = stored_pixels(self.image, np.float32)
        self.variance = stored_pixels(self.variance, np.float32)
        if self.image.ndim != 2:
            raise InputError(f"image: expected a 2-d array, got shape {self.image.shape}")
        if self.variance.shape != self.image.shape:
            raise InputError(
                f"variance: expected shape {self.image.shape} (the image's), "
                f"got {self.variance.shape}"
            )
        if self.mask is None:
            self.mask = Mask.zeros(self.image.shape)
        elif self.mask.shape != self.image.shape:
            raise InputError(
                f"mask: expected shape {self.image.shape} (the image's), got {self.mask.shape}"
            )
        if self.wcs is not None and not self.wcs.has_celestial:
            raise InputError("wcs: expected a celestial WCS (RA/Dec axes)")

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.image.shape  # type: ignore[return-value]

    @property
    def width(self) -> int:
        return self.image.shape[1]

    @property
    def height(self) -> int:
        return self.image.shape[0]

    def copy(self) -> Exposure:
        """A deep copy (pixels and descriptions)."""
        return _copy.deepcopy(self)

    def pixel_to_sky(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel positions (0-based, centre of first pixel is 0) -> (ra, dec) in degrees."""
        if self.wcs is None:
            raise InputError("exposure has no WCS")
        ra, dec = self.wcs.all_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
        return ra, dec

    def sky_to_pixel(self, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ra, dec) in degrees -> 0-based pixel positions (SIP inverted iteratively)."""
        if self.wcs is None:
            raise InputError("exposure has no WCS")
        x, y = self.wcs.all_world2pix(np.asarray(ra, float), np.asarray(dec, float), 0,
                                      tolerance=1e-8, maxiter=50, quiet=True)
        return x, y

    def same_grid(self, other: Exposure) -> bool:
        """True when ``other`` has the same shape and the same WCS (SIP terms included), so
        pixel positions carry over unchanged.

        Examples
        --------
        >>> import numpy as np
        >>> a = Exposure(np.zeros((8, 16)), np.ones((8, 16)))
        >>> a.same_grid(a.copy())
        True
        """
        if self.shape != other.shape:
            return False
        if self.wcs is None or other.wcs is None or self.wcs is other.wcs:
            return self.wcs is other.wcs
        # wcslib's own comparison (far cheaper than rendering both headers); it leaves out
        # the SIP polynomials, which astropy keeps apart.
        if not self.wcs.wcs.compare(other.wcs.wcs):
            return False
        sip, other_sip = self.wcs.sip, other.wcs.sip
        if sip is None or other_sip is None:
            return sip is other_sip
        pairs = [(getattr(sip, name), getattr(other_sip, name))
                 for name in ("a", "b", "ap", "bp", "crpix")]  # ap, bp may be None
        return all(a is b or (a is not None and b is not None and np.array_equal(a, b))
                   for a, b in pairs)

    def write_fits(self, path: str | Path, overwrite: bool = True) -> Path:
        """Write the multi-extension FITS file (see :mod:`apqa.datamodel.fits_io`)."""
        from apqa.datamodel.fits_io import write_exposure

        return write_exposure(self, path, overwrite=overwrite)

    @classmethod
    def from_fits(cls, path: str | Path, require_wcs: bool = True, lazy: bool = False,
                  direct: bool = False, defer_wcs: bool = False) -> Exposure:
        """Read an apqa exposure or a plain single-HDU FITS image.

        See :func:`apqa.datamodel.fits_io.read_exposure` for the header keywords used, for
        ``lazy`` (memory-mapped, read-only planes), ``direct`` (read-only planes read past
        the page cache) and ``defer_wcs`` (the WCS parsed on first use).
        """
        from apqa.datamodel.fits_io import read_exposure

        return read_exposure(path, require_wcs=require_wcs, lazy=lazy, direct=direct,
                             defer_wcs=defer_wcs)
