"""PSF models brought as FITS images (STPSF/WebbPSF, PSFEx snapshots, a stacked star).

For images whose own stars cannot give a PSF model: a deep extragalactic field with almost no
stars, a small cut-out. The model is the image itself, the same everywhere on the detector.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from apqa.datamodel.psf import GridPsf
from apqa.errors import InputError

#: The extension STPSF (WebbPSF) writes the PSF at the detector's own sampling to.
DETECTOR_SAMPLED = "DET_SAMP"


def read_psf_image(path: str | Path) -> GridPsf:
    """A constant PSF from a FITS image: odd-sized square, centred on its central pixel, at
    the detector's pixel scale (STPSF's ``DET_SAMP`` extension is taken when present, else
    the first 2-d image). Normalized to sum 1.

    Raises
    ------
    InputError
        Naming the file: unreadable, no 2-d image, not an odd square, non-finite pixels or no
        positive sum.

    Examples
    --------
    >>> psf = read_psf_image("stpsf_f200w.fits")   # doctest: +SKIP
    >>> psf.image_at(100.0, 200.0).sum()           # doctest: +SKIP
    1.0
    """
    path = Path(path)
    try:
        with fits.open(path) as hdul:
            names = [hdu.name for hdu in hdul]
            hdu = (hdul[DETECTOR_SAMPLED] if DETECTOR_SAMPLED in names else
                   next((h for h in hdul if h.data is not None and np.ndim(h.data) == 2),
                        None))
            if hdu is None or np.ndim(hdu.data) != 2:
                raise InputError(f"{path}: no 2-d PSF image in any HDU")
            image = np.array(hdu.data, dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable FITS file ({exc})") from None
    height, width = image.shape
    if height != width or height % 2 == 0:
        raise InputError(f"{path}: PSF image is {width}x{height}; expected an odd-sized square "
                         "centred on its central pixel")
    if not np.isfinite(image).all():
        raise InputError(f"{path}: PSF image has non-finite pixels")
    total = image.sum()
    if not total > 0:
        raise InputError(f"{path}: PSF image does not sum to a positive value ({total:g})")
    return GridPsf(np.zeros(1), np.zeros(1), (image / total)[None, None])


def read_psf_images(*paths: str | Path | None) -> tuple[GridPsf | None, ...]:
    """:func:`read_psf_image` of each path given, None where a path is None (the science's and
    the template's optional PSF files of ``apqa diff`` and ``apqa run``)."""
    return tuple(None if path is None else read_psf_image(path) for path in paths)
