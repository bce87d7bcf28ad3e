"""Data model: exposures (image, mask, variance, PSF, WCS, photometric calibration, visit info)."""

from apqa.datamodel.exposure import Exposure
from apqa.datamodel.mask import DEFAULT_PLANES, Mask
from apqa.datamodel.photocalib import PhotoCalib, abmag_to_njy, njy_to_abmag
from apqa.datamodel.psf import (
    GridPsf,
    MoffatPsf,
    PolynomialPsf,
    Psf,
    measure_fwhm,
    psf_stamps,
    shift_kernels,
)
from apqa.datamodel.visitinfo import DetectorInfo, VisitInfo

__all__ = [
    "DEFAULT_PLANES",
    "DetectorInfo",
    "Exposure",
    "GridPsf",
    "Mask",
    "MoffatPsf",
    "PhotoCalib",
    "PolynomialPsf",
    "Psf",
    "VisitInfo",
    "abmag_to_njy",
    "measure_fwhm",
    "njy_to_abmag",
    "psf_stamps",
    "shift_kernels",
]
