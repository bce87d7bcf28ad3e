"""FITS input and output of exposures.

The apqa format is a multi-extension FITS file that astropy and ds9 open directly:

====  ==========  ===========================================================================
HDU   EXTNAME     content
====  ==========  ===========================================================================
0     (primary)   visit/detector info, photometric calibration, ``APQAFMT`` format version
1     IMAGE       float32 pixels, celestial WCS (TAN or TAN-SIP) in the header
2     MASK        int32 bit mask; ``MP_<PLANE>`` cards give the plane -> bit map
3     VARIANCE    float32 variance
4     PSF         optional: PSF kernels on a grid of positions, cube of shape (n_nodes, k, k)
====  ==========  ===========================================================================

Plain single-HDU images (as users bring them) are read too, taking GAIN, RDNOISE/READNOISE,
SATURATE, MAGZERO/PHOTZP, EXPTIME, FILTER and MJD-OBS/DATE-OBS from the header
(:mod:`apqa.datamodel.fits_plain`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning

from apqa.atomic import hash_file, write_atomically
from apqa.datamodel.direct_io import StreamWriter, read_direct
from apqa.datamodel.exposure import Exposure
from apqa.datamodel.fits_plain import read_plain, read_wcs
from apqa.datamodel.header_wcs import HeaderWcs
from apqa.datamodel.mask import Mask
from apqa.datamodel.photocalib import PhotoCalib
from apqa.datamodel.psf import GridPsf, MoffatPsf, PolynomialPsf, Psf
from apqa.datamodel.visitinfo import DetectorInfo, VisitInfo
from apqa.errors import InputError

if TYPE_CHECKING:
    from hashlib import _Hash as Hash

    from astropy.wcs import WCS

FORMAT_VERSION = 1

_VISIT_CARDS = {
    "visit": ("VISIT", "visit id"),
    "detector": ("DETECTOR", "detector id"),
    "band": ("BAND", "abstract band"),
    "physical_filter": ("FILTER", "physical filter"),
    "mjd": ("MJDTAI", "exposure midpoint, MJD (TAI)"),
    "exposure_time": ("EXPTIME", "[s] exposure time"),
    "airmass": ("AIRMASS", "airmass at midpoint"),
    "seeing": ("SEEING", "[arcsec] delivered FWHM"),
    "boresight_ra": ("BORE-RA", "[deg] boresight RA"),
    "boresight_dec": ("BORE-DEC", "[deg] boresight Dec"),
    "rotation_angle": ("ROTANG", "[deg] rotation angle"),
}
# Cards that the reader interprets; everything else on the primary header is kept as metadata.
_RESERVED = {card for card, _ in _VISIT_CARDS.values()} | {
    "APQAFMT", "GAIN", "RDNOISE", "SATURATE", "DETNAME", "PHOTCAL", "PHOTCALE", "MAGZERO",
    "MJD-OBS", "SIMPLE", "BITPIX", "NAXIS", "EXTEND", "HASPSF",
}


def _finite_or_none(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def _psf_hdu(psf: Psf) -> fits.ImageHDU:
    grid = psf.to_grid()  # type: ignore[attr-defined]
    ny, nx, k, _ = grid.images.shape
    hdu = fits.ImageHDU(grid.images.reshape(ny * nx, k, k), name="PSF")
    hdu.header["PSFNX"] = (nx, "grid nodes along x")
    hdu.header["PSFNY"] = (ny, "grid nodes along y")
    for i, x in enumerate(grid.nodes_x):
        hdu.header[f"PSFX{i}"] = float(x)
    for j, y in enumerate(grid.nodes_y):
        hdu.header[f"PSFY{j}"] = float(y)
    if isinstance(psf, MoffatPsf):
        hdu.header["PSFTYPE"] = ("MOFFAT", "analytic model; the grid is a sampling of it")
        hdu.header["PSFW"], hdu.header["PSFH"] = psf.width, psf.height
        hdu.header["PSFBETA"], hdu.header["PSFTRUNC"] = psf.beta, psf.trunc
        hdu.header["PSFORDER"] = (psf.order, "Gauss-Legendre nodes per pixel side")
        for name in ("fwhm", "g1", "g2"):
            for i, c in enumerate(getattr(psf, f"{name}_coeffs")):
                hdu.header[f"HIERARCH PSF_{name.upper()}_{i}"] = float(c)
    elif isinstance(psf, PolynomialPsf):
        hdu.header["PSFTYPE"] = ("POLY", "pixel basis; coefficients in HDU PSF_COEFFS")
        hdu.header["PSFW"], hdu.header["PSFH"] = psf.width, psf.height
        hdu.header["PSFPORD"] = (psf.order, "polynomial order of the spatial variation")
    else:
        hdu.header["PSFTYPE"] = ("GRID", "bilinear interpolation between grid kernels")
    return hdu


def _psf_from_hdu(hdu: fits.ImageHDU, source: str,
                  coeff_hdu: fits.ImageHDU | None = None) -> Psf:
    h = hdu.header
    try:
        if h.get("PSFTYPE") == "MOFFAT":
            coeffs = {
                name: [h[key] for i in range(6) if (key := f"PSF_{name.upper()}_{i}") in h]
                for name in ("fwhm", "g1", "g2")
            }
            return MoffatPsf(
                width=int(h["PSFW"]), height=int(h["PSFH"]),
                fwhm_coeffs=coeffs["fwhm"], g1_coeffs=coeffs["g1"], g2_coeffs=coeffs["g2"],
                beta=float(h["PSFBETA"]), trunc=float(h["PSFTRUNC"]),
                order=int(h.get("PSFORDER", 2)),
            )
        if h.get("PSFTYPE") == "POLY":
            if coeff_hdu is None:
                raise KeyError("HDU PSF_COEFFS")
            return PolynomialPsf(int(h["PSFW"]), int(h["PSFH"]),
                                 np.asarray(coeff_hdu.data, np.float64), int(h["PSFPORD"]))
        nx, ny = int(h["PSFNX"]), int(h["PSFNY"])
        xs = [h[f"PSFX{i}"] for i in range(nx)]
        ys = [h[f"PSFY{j}"] for j in range(ny)]
        data = np.asarray(hdu.data, np.float32)
        return GridPsf(np.array(xs), np.array(ys), data.reshape(ny, nx, *data.shape[1:]))
    except (KeyError, ValueError) as exc:
        raise InputError(f"{source}: HDU 'PSF': malformed PSF extension ({exc})") from None


def _wcs_header(wcs: WCS | HeaderWcs) -> fits.Header:
    if isinstance(wcs, HeaderWcs):
        return wcs.header_cards()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        return wcs.to_header(relax=True)


def _fitting(card: fits.Card) -> fits.Card:
    """``card`` without its comment when a string value leaves the comment no room in one
    80-character card (astropy would truncate it and warn on every write); longer values
    continue over several cards, comment included."""
    value = card.value
    if isinstance(value, str) and card.comment and len(value) + 2 <= 70:
        # KEYWORD = 'value' / comment, the quoted value padded to 20 characters.
        if 10 + max(len(value.replace("'", "''")) + 2, 20) + 3 + len(card.comment) > 80:
            return fits.Card(card.keyword, value)
    return card


def write_exposure(exposure: Exposure, path: str | Path, overwrite: bool = True,
                   digest: Hash | None = None) -> Path:
    """Write ``exposure`` as an apqa multi-extension FITS file, atomically.

    The file is written next to its destination and renamed into place, so a crash never
    leaves a partial file under the final name. ``digest`` (a ``hashlib`` object), when
    given, is updated with every byte of the file as it is written: a checksum without
    reading the file back.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path}: file exists (pass overwrite=True to replace it)")
    primary = fits.PrimaryHDU()
    header = primary.header
    header["APQAFMT"] = (FORMAT_VERSION, "apqa exposure format version")
    for card in exposure.metadata.cards:
        if card.keyword and card.keyword not in _RESERVED and (
            card.keyword not in header or card.keyword in ("COMMENT", "HISTORY")
        ):
            header.append(_fitting(card))
    if exposure.visit_info is not None:
        for attr, (key, comment) in _VISIT_CARDS.items():
            value = getattr(exposure.visit_info, attr)
            if isinstance(value, float):
                value = _finite_or_none(value)
            if value is not None:
                header[key] = (value, comment)
    if exposure.detector_info is not None:
        det = exposure.detector_info
        # FITS headers cannot hold NaN (unknown gain/read noise of plain images): omit those.
        if np.isfinite(det.gain):
            header["GAIN"] = (det.gain, "[e-/ADU]")
        if np.isfinite(det.read_noise):
            header["RDNOISE"] = (det.read_noise, "[e-] read noise")
        if np.isfinite(det.saturation):
            header["SATURATE"] = (det.saturation, "[ADU] saturation level")
        header["DETNAME"] = det.name  # always written: marks that detector info is present
    if exposure.photo_calib is not None:
        header["PHOTCAL"] = (exposure.photo_calib.calibration_mean, "[nJy/count]")
        header["PHOTCALE"] = (exposure.photo_calib.calibration_err, "[nJy/count] error")
        header["MAGZERO"] = (exposure.photo_calib.zero_point, "AB mag of one count")
    header["HASPSF"] = exposure.psf is not None

    wcs_header = _wcs_header(exposure.wcs) if exposure.wcs is not None else fits.Header()
    image = fits.ImageHDU(exposure.image, header=wcs_header.copy(), name="IMAGE")
    mask_header = wcs_header.copy()
    exposure.mask.to_header(mask_header)
    mask = fits.ImageHDU(exposure.mask.array, header=mask_header, name="MASK")
    variance = fits.ImageHDU(exposure.variance, header=wcs_header.copy(), name="VARIANCE")
    hdus = [primary, image, mask, variance]
    if exposure.psf is not None:
        hdus.append(_psf_hdu(exposure.psf))
        if isinstance(exposure.psf, PolynomialPsf):
            hdus.append(fits.ImageHDU(exposure.psf.coefficients.astype(np.float64),
                                      name="PSF_COEFFS"))

    return write_atomically(path, lambda tmp: _write_hdus(fits.HDUList(hdus), tmp, digest))


def _write_hdus(hdus: fits.HDUList, path: str, digest: Hash | None = None) -> None:
    """Write ``hdus`` as FITS: astropy's headers (checked as ``writeto`` checks them), the data
    converted to big-endian straight into the writer's buffer, past the page cache where the
    filesystem allows (:class:`~apqa.datamodel.direct_io.StreamWriter`), every byte also fed
    to ``digest``.

    astropy byte-swaps each whole array in place before writing it and back afterwards: two
    passes over every plane where one conversion does, and the caller's arrays are never
    modified here. Written directly, a 2048x4096 exposure's 100 MB skip the page cache, whose
    fresh pages cost a host fault each on the project's machines.
    """
    hdus.verify("exception")
    if any(hdu.data is not None and (hdu.data.dtype.kind not in "fi" or "BZERO" in hdu.header)
           for hdu in hdus):  # stored with an offset (unsigned, bool): astropy scales them
        hdus.writeto(path, overwrite=True)
        if digest is not None:
            hash_file(path, digest)
        return
    with StreamWriter(path, digest) as stream:
        for hdu in hdus:
            stream.write(hdu.header.tostring().encode("ascii"))
            data = hdu.data
            if data is None:
                continue
            stream.write_array(data, data.dtype.newbyteorder(">"))
            stream.write(bytes(-data.nbytes % 2880))  # pad to whole FITS blocks


def _read_planes_direct(hdul: fits.HDUList, path: Path) -> dict[str, np.ndarray]:
    """IMAGE, VARIANCE and MASK as big-endian views of the file read whole with direct I/O
    (data offsets from the headers; scaled planes, with BZERO or BSCALE, are left to astropy).
    """
    raw = read_direct(path)
    planes = {}
    for name in ("IMAGE", "VARIANCE", "MASK"):
        if name not in hdul:
            continue
        index = hdul.index_of(name)
        header = hdul[index].header
        dtype = _BITPIX.get(header.get("BITPIX"))
        if dtype is None or "BZERO" in header or "BSCALE" in header:
            continue
        shape = hdul[index].shape
        planes[name] = np.frombuffer(raw, dtype, count=int(np.prod(shape)),
                                     offset=hdul.fileinfo(index)["datLoc"]).reshape(shape)
    return planes


#: Big-endian dtypes of FITS BITPIX values.
_BITPIX = {8: np.dtype("u1"), 16: np.dtype(">i2"), 32: np.dtype(">i4"), 64: np.dtype(">i8"),
           -32: np.dtype(">f4"), -64: np.dtype(">f8")}


def _read_apqa(hdul: fits.HDUList, source: str, require_wcs: bool, lazy: bool = False,
               planes: dict[str, np.ndarray] | None = None, defer_wcs: bool = False
               ) -> Exposure:
    names = [h.name for h in hdul]
    for needed in ("IMAGE", "MASK", "VARIANCE"):
        if needed not in names:
            raise InputError(f"{source}: apqa exposure lacks the '{needed}' HDU (found {names})")
    primary = hdul[0].header
    planes = planes or {}

    def plane(name: str) -> np.ndarray:
        return planes[name] if name in planes else np.asarray(hdul[name].data)

    image, variance, mask_array = plane("IMAGE"), plane("VARIANCE"), plane("MASK")
    if lazy:
        # Read-only views of the mapped file: Exposure and Mask keep them as they are.
        for plane in (image, variance, mask_array):
            plane.flags.writeable = False
    for name, array in (("IMAGE", image), ("VARIANCE", variance), ("MASK", mask_array)):
        if array.ndim != 2:
            raise InputError(f"{source}: HDU '{name}': expected a 2-d array, got {array.shape}")
    for name, array in (("VARIANCE", variance), ("MASK", mask_array)):
        if array.shape != image.shape:
            raise InputError(
                f"{source}: HDU '{name}': expected shape {image.shape} (the IMAGE's), "
                f"got {array.shape}"
            )
    mask = Mask(mask_array, Mask.planes_from_header(hdul["MASK"].header))
    wcs = read_wcs(hdul["IMAGE"].header, f"{source}[IMAGE]", require_wcs, defer_wcs)
    visit_info = None
    if "VISIT" in primary:
        values = {}
        for attr, (key, _) in _VISIT_CARDS.items():
            if key in primary:
                values[attr] = primary[key]
            elif attr not in ("visit", "detector", "band", "physical_filter"):
                values[attr] = float("nan")  # the writer omits non-finite values
        visit_info = VisitInfo(**values)
    detector_info = None
    if any(key in primary for key in ("GAIN", "RDNOISE", "SATURATE", "DETNAME")):
        detector_info = DetectorInfo(
            gain=float(primary.get("GAIN", np.nan)),
            read_noise=float(primary.get("RDNOISE", np.nan)),
            saturation=float(primary.get("SATURATE", np.inf)),
            name=str(primary.get("DETNAME", "")),
        )
    photo_calib = None
    if "PHOTCAL" in primary:
        photo_calib = PhotoCalib(float(primary["PHOTCAL"]), float(primary.get("PHOTCALE", 0.0)))
    psf = (_psf_from_hdu(hdul["PSF"], source,
                         hdul["PSF_COEFFS"] if "PSF_COEFFS" in names else None)
           if "PSF" in names else None)
    metadata = fits.Header([c for c in primary.cards if c.keyword not in _RESERVED])
    return Exposure(
        image=image, variance=variance, mask=mask, psf=psf, wcs=wcs, photo_calib=photo_calib,
        visit_info=visit_info, detector_info=detector_info, metadata=metadata,
    )


def read_exposure(path: str | Path, require_wcs: bool = True, lazy: bool = False,
                  direct: bool = False, defer_wcs: bool = False) -> Exposure:
    """Read an exposure from FITS.

    Parameters
    ----------
    path
        An apqa multi-extension file (``APQAFMT`` in the primary header) or a plain FITS image
        (first HDU with 2-d data).
    require_wcs
        Raise :class:`~apqa.errors.InputError` when there is no celestial WCS.
    lazy
        For apqa files: keep the pixel planes memory-mapped, read-only and big-endian as
        stored, so that only the pixels used are read (cut-outs, photometry at a few
        positions). Such planes cannot be changed in place, and C extensions that need native
        byte order (sep) cannot take them. Plain FITS images are always read whole.
    direct
        With ``lazy``: read the planes whole, past the page cache
        (:func:`~apqa.datamodel.direct_io.read_direct`), instead of mapping them. For files
        written with direct I/O (apqa's own), whose pages are not cached, mapped stamps cost
        a disk read each: the cut-outs and forced photometry of a 2048x4096 unit's three
        images took 0.8 s mapped, their 300 MB 0.2 s read directly.
    defer_wcs
        Leave the WCS unparsed until something uses it (a
        :class:`~apqa.datamodel.header_wcs.HeaderWcs`), when its CTYPE cards name celestial
        axes: aligned images are differenced without importing astropy.wcs.

    Notes
    -----
    For plain images: ``GAIN`` (e-/ADU), ``RDNOISE``/``READNOISE`` (e-), ``SATURATE`` (ADU; pixels
    at or above it get SAT), ``MAGZERO``/``PHOTZP`` (AB mag of one count), ``EXPTIME`` (s),
    ``FILTER`` (physical filter; the band is derived from it), ``MJD-OBS`` or ``DATE-OBS``
    (exposure start, ``TIMESYS`` scale, UTC by default; stored as the TAI midpoint). NaN pixels
    become NO_DATA with zero image and infinite variance. The variance is the sky variance
    measured from the pixels plus the sources' Poisson term from GAIN when present.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise InputError(f"{source}: file not found")
    try:
        hdul = fits.open(path, memmap=lazy)
    except OSError as exc:
        raise InputError(f"{source}: not a readable FITS file ({exc})") from None
    with hdul:
        if "APQAFMT" in hdul[0].header:
            version = int(hdul[0].header["APQAFMT"])
            if version > FORMAT_VERSION:
                raise InputError(
                    f"{source}: APQAFMT={version} is newer than this apqa reads "
                    f"({FORMAT_VERSION}); upgrade apqa"
                )
            planes = _read_planes_direct(hdul, path) if lazy and direct else None
            exposure = _read_apqa(hdul, source, require_wcs, lazy, planes, defer_wcs)
            if not lazy and not np.isfinite(exposure.image).any():
                raise InputError(f"{source}: image has no finite pixels")
        else:  # checks its pixels itself
            exposure = read_plain(hdul, source, require_wcs, defer_wcs)
    return exposure
