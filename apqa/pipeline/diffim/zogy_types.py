"""ZOGY's settings and result types, and the difference's mask from the inputs' planes.

Split from :mod:`apqa.pipeline.diffim.zogy`, which holds the public API and the main flow and
re-exports these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydantic import Field

from apqa.config import ConfigModel
from apqa.datamodel import Exposure, Mask
from apqa.datamodel.blocks import ROWS, row_blocks


class ZogyConfig(ConfigModel):
    """ZOGY subtraction settings."""

    pad: int | None = Field(
        None, ge=0,
        description="zero padding (pixels) against FFT wrap-around; default: the kernel "
                    "half-width (at least the PSF stamp size)")
    taper: int | None = Field(
        None, ge=0,
        description="width (pixels) of the raised-cosine taper at the image edges and around "
                    "masked pixels; default 2 FWHM of the broader PSF")
    kernel_radius: int | None = Field(
        None, ge=3,
        description="half-width (pixels) of the real-space ZOGY kernels; default the smallest "
                    "that keeps all but kernel_tolerance of their power (at most 128)")
    kernel_tolerance: float = Field(
        1e-5, gt=0, lt=1,
        description="largest fraction of a ZOGY kernel's power allowed outside kernel_radius")
    fit_flux_ratio: bool = Field(
        True, description="fit F_r/F_n from bright stars (robust) instead of trusting "
                          "photo_calib alone")
    flux_ratio: float | None = Field(
        None, gt=0, description="use this F_r/F_n (template counts per science count) as given")
    flux_ratio_min_snr: float = Field(
        20.0, gt=0, description="matched-filter S/N of the science stars used in the fit")
    flux_ratio_min_stars: int = Field(5, ge=1)
    flux_ratio_max_stars: int = Field(
        300, ge=1, description="the brightest are kept (300 give a ratio good to ~1e-4)")
    flux_ratio_clip: float = Field(4.0, gt=0, description="outlier clip, in robust sigma")
    zero_mask_planes: list[str] = Field(
        default_factory=lambda: ["NO_DATA", "BAD", "SAT", "EDGE"],
        description="pixels with any of these planes in either input are set to 0 (tapered)")
    clear_mask_planes: list[str] = Field(
        default_factory=lambda: ["DETECTED", "DETECTED_NEGATIVE"],
        description="input planes not carried to the difference (they describe the inputs' "
                    "detections, not the difference's)")
    template_plane_renames: dict[str, str] = Field(
        default_factory=lambda: {"INJECTED": "INJECTED_TEMPLATE",
                                 "INJECTED_CORE": "INJECTED_CORE_TEMPLATE"},
        description="template mask planes renamed in the difference, so sources injected into "
                    "the template stay distinguishable from those injected into the science")
    source_threshold: float = Field(
        4.0, gt=0, description="matched-filter S/N above which input pixels count as sources "
                               "(excluded from noise statistics) when mask_sources is not given")
    recenter_psf: bool = Field(
        True, description="shift each PSF kernel so its windowed centroid is exactly at its "
                          "central pixel")
    epsilon: float = Field(
        1e-12, ge=0, description="regularization of den^2, relative to its zero-frequency value")
    rescale_variance: bool = Field(
        True, description="scale the difference variance (and the score) to the noise measured "
                          "in source-free pixels")
    astrometric_sigma: tuple[float, float] = Field(
        (0.0, 0.0), description="rms registration error (pixels) of the science and of the "
                                "template, for the score's astrometric-noise term; 0 is off")
    tile_size: int | None = Field(
        1024, ge=256,
        description="subtract in overlapping tiles of about this size (pixels), each with the "
                    "PSFs at its centre, to follow spatially varying PSFs (no slower: smaller "
                    "FFTs); None: one PSF pair, at the image centre")
    workers: int | None = Field(
        None, description="scipy.fft workers (-1: all cores; None: the caller's "
                          "scipy.fft.set_workers setting, 1 by default)")


@dataclass
class ZogyResult:
    """The outputs of :func:`zogy_subtract`.

    Attributes
    ----------
    difference
        D in the science image's counts: image, variance, mask (both inputs' planes OR-ed, the
        tapered zone EDGE), ``psf`` = P_D as a :class:`GridPsf` with a node at each tile's
        centre (each kernel sums to 1 and is centred), and the science's WCS, photometric
        calibration and visit info.
    score
        S_corr: the point-source detection statistic in Gaussian sigma, corrected for source
        noise (and astrometric noise when configured); 0 on masked pixels. None when not
        asked for.
    score_psf
        The score's response to a point source (P_D autocorrelation), odd-sized, centred,
        peak 1.
    flux_ratio
        F_r / F_n used: template counts per science count of the same source.
    quality
        Diagnostics; see :func:`zogy_subtract`.
    """

    difference: Exposure
    score: np.ndarray | None
    score_psf: np.ndarray
    flux_ratio: float
    quality: dict[str, float] = field(default_factory=dict)


def _output_mask(science: Mask, template: Mask, config: ZogyConfig) -> Mask:
    """Science planes OR template planes (by name; some template planes renamed), without
    the planes of ``config.clear_mask_planes``.

    One pass over the masks by blocks of rows: template bits move to their output bits in
    groups that share a shift, instead of a full-image pass per plane.
    """
    planes = dict(science.planes)
    out = Mask(np.empty_like(science.array), planes)
    present = int(np.bitwise_or.reduce(template.array, axis=None))
    moves: dict[int, int] = {}  # shift (output bit - template bit) -> template bits
    for name, bit in template.planes.items():
        if present & (1 << bit):
            target = out.add_plane(config.template_plane_renames.get(name, name))
            moves[target - bit] = moves.get(target - bit, 0) | (1 << bit)
    keep = ~out.bitmask([n for n in config.clear_mask_planes if n in planes])
    part = np.empty((min(ROWS, science.array.shape[0]), science.array.shape[1]),
                    science.array.dtype)
    for rows in row_blocks(science.array.shape[0]):
        block = out.array[rows]
        np.copyto(block, science.array[rows])
        moved = part[:len(block)]
        for shift, bits in moves.items():
            np.bitwise_and(template.array[rows], bits, out=moved)
            if shift > 0:
                np.left_shift(moved, shift, out=moved)
            elif shift < 0:
                np.right_shift(moved, -shift, out=moved)
            block |= moved
        block &= keep
    return out
