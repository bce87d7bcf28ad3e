"""Alard-Lupton PSF matching with a spatially varying kernel, and the decorrelation afterburner.

The kernel (:mod:`apqa.pipeline.diffim.al_kernel`) varies linearly over the image, so
convolving the whole image needs one FFT of the convolved image and one inverse FFT per spatial
term. The decorrelation (Rubin DMTN-179) is applied in the same Fourier space: the difference's
noise spectrum is flattened by ``sqrt((u_var + c_var kSum^2) / (u_var + c_var |K(k)|^2))``, which
is 1 at k = 0 (flux preserved), and its PSF is the science PSF seen through the same filter.
Pixels within the kernel's reach of the border or of missing data are masked EDGE / NO_DATA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.fft as sfft
from pydantic import Field

from apqa.config import ConfigModel
from apqa.datamodel import Exposure, GridPsf, Mask, PolynomialPsf, Psf
from apqa.datamodel.blocks import row_blocks
from apqa.datamodel.columns import Columns
from apqa.datamodel.psf import convolve_full
from apqa.errors import StageError
from apqa.pipeline.background import subtract_binned_background
from apqa.pipeline.diffim.al_kernel import (
    MatchingKernel,
    fit_kernel,
    gaussian_poly_basis,
    require_candidates,
    select_candidates,
)
from apqa.pipeline.diffim.prepare import find_bright_sources
from apqa.pipeline.diffim.warp_resample import noise_transfer
from apqa.pipeline.fftconv import centred_kernel_spectrum, convolve_same
from apqa.pipeline.pixels import boxes, grow_square
from apqa.pipeline.threads import beside, core_budget

SIGMA_TO_FWHM = 2.3548


class AlConfig(ConfigModel):
    """Alard-Lupton settings (Rubin's defaults where they exist)."""

    basis_sigma_factors: tuple[float, ...] = Field(
        (0.5, 1.0, 2.0), description="basis Gaussian sigmas in units of the matching sigma")
    basis_degrees: tuple[int, ...] = Field((4, 2, 2), description="polynomial degree per Gaussian")
    min_kernel_size: int = 21
    max_kernel_size: int = 35
    spatial_order: int = Field(1, ge=0, le=1, description="kernel spatial variation")
    background_order: int = Field(2, ge=0, le=2, description="differential background")
    candidate_min_snr: float = 10.0
    candidate_max_snr: float = 500.0
    cell_size: int = Field(128, description="candidate grid cell (pixels)")
    per_cell: int = Field(5, description="brightest candidates kept per cell")
    max_candidates: int = Field(150, description="cap on kernel stamps (the fit's cost)")
    min_candidates: int = Field(3, description="fewer usable stamps: StageError")
    min_spatial_candidates: int = Field(
        15, description="fewer stamps: spatially constant kernel and background")
    clip_sigma: float = 3.0
    n_clip: int = 3
    decorrelate: bool = True
    residual_background_mesh: int | None = Field(
        256, ge=32, description="mesh (px) of the background left in the difference, measured "
                                "on pixels no source touches and removed (None: keep it). The "
                                "differential background fitted in kernel stamps is poorly "
                                "constrained (the broad kernel bases mimic a constant)")


@dataclass
class DiffimResult:
    """A difference image and its quality numbers."""

    difference: Exposure
    quality: dict[str, float] = field(default_factory=dict)
    kernel: np.ndarray | None = None  # the matching kernel at the image centre
    template: Exposure | None = None  # the template on the science grid (warped if needed)


def _subtract_background(image: np.ndarray, uu: np.ndarray, vv: np.ndarray,
                         coeffs: np.ndarray) -> None:
    """Subtract the fitted differential background (terms 1, u, v, u^2, uv, v^2 up to the
    number of ``coeffs``) from ``image`` in place, from the row (1, w) and column (h, 1)
    coordinate vectors, a block of rows at a time (no image-sized temporary)."""
    c = np.zeros(6, np.float32)
    c[:len(coeffs)] = coeffs
    # Per row: c0 + c2 v + c5 v^2 + (c1 + c4 v) u + c3 u^2.
    constant = c[0] + c[2] * vv + c[5] * vv * vv
    slope = c[1] + c[4] * vv
    quadratic = c[3] * uu * uu
    for rows in row_blocks(image.shape[0]):
        image[rows] -= constant[rows] + slope[rows] * uu + quadratic


def _weighted_sum(a: np.ndarray, wa: np.float32, b: np.ndarray, wb: np.float32) -> np.ndarray:
    """``a * wa + wb * b`` in float32, a block of rows at a time (one image-sized array)."""
    out = np.multiply(a, wa, dtype=np.float32)
    for rows in row_blocks(out.shape[0]):
        out[rows] += wb * b[rows]
    return out


def warp_kernel(exposure: Exposure) -> str | None:
    """The resampling kernel of a warped exposure (its noise is correlated), else None."""
    meta = exposure.metadata
    if str(meta.get("OBSTYPE", "")).lower() == "warp" and "WARPKERN" in meta:
        return str(meta["WARPKERN"])
    return None


def _warp_power(warp: str | None, shape: tuple[int, int], real: bool) -> np.ndarray | float:
    """Noise power transfer of a warp on the (r)fft2 grid of ``shape`` (1 without a warp)."""
    if warp is None:
        return 1.0
    fy = sfft.fftfreq(shape[0])
    fx = sfft.rfftfreq(shape[1]) if real else sfft.fftfreq(shape[1])
    return np.outer(noise_transfer(warp, fy)[0], noise_transfer(warp, fx)[0]).astype(np.float32)


def _variance_factor(warp: str | None) -> float:
    """Per-pixel variance of a warped image over that of its white input noise."""
    return 1.0 if warp is None else noise_transfer(warp, np.zeros(1))[1] ** 2


def decorrelation_filter(kernel_power: np.ndarray, ksum: float, target_var: float,
                         ref_var: float, target_power: np.ndarray | float = 1.0,
                         ref_power: np.ndarray | float = 1.0, overwrite_power: bool = False
                         ) -> np.ndarray:
    """``sqrt((t + c kSum^2) / (t P_t(k) + c |K(k)|^2 P_r(k)))`` (float32 for float32 power).

    ``t``, ``c`` are the white-noise variances of the target and of the convolved image and
    ``P_t``, ``P_r`` their noise power transfers (1, or a warp's); the filtered difference has
    white noise of variance ``t + c kSum^2``, and the filter is 1 at k = 0 (flux preserved).
    With ``overwrite_power`` the filter is built in ``kernel_power``'s own (float32) buffer.
    """
    phi = kernel_power if overwrite_power else kernel_power.astype(
        np.result_type(kernel_power.dtype, np.float32))
    phi *= np.float32(ref_var)
    phi *= ref_power
    phi += np.float32(target_var) * target_power
    np.divide(np.float32(target_var + ref_var * ksum**2), phi, out=phi)
    return np.sqrt(phi, out=phi)


def decorrelation_kernel(kernel: np.ndarray, unconvolved_var: float, convolved_var: float,
                         size: int, target_warp: str | None = None,
                         ref_warp: str | None = None) -> np.ndarray:
    """Real-space decorrelation filter (centred, ``size`` x ``size``) for a matching kernel
    (see :func:`decorrelation_filter`; variances of the white input noise)."""
    n = max(size, 2 * kernel.shape[0]) * 2
    padded = np.zeros((n, n))
    h = kernel.shape[0] // 2
    padded[:kernel.shape[0], :kernel.shape[1]] = kernel
    padded = np.roll(padded, (-h, -h), axis=(0, 1))  # kernel centre at pixel (0, 0)
    ft = np.fft.fft2(padded)
    corr = decorrelation_filter(np.abs(ft) ** 2, float(kernel.sum()), unconvolved_var,
                                convolved_var, _warp_power(target_warp, (n, n), False),
                                _warp_power(ref_warp, (n, n), False))
    phi = np.real(np.fft.ifft2(corr))
    phi = np.roll(phi, (size // 2, size // 2), axis=(0, 1))[:size, :size]
    return phi / phi.sum()


def _convolve_psf(psf: Psf, kernel: np.ndarray, shape: tuple[int, int]) -> Psf:
    """The PSF seen through ``kernel`` (spatially constant), as the same kind of model."""
    # 'full' convolution cropped to the PSF size plus the kernel's reach: the broadened PSF
    # must not lose its wings (flux) to the original stamp size.
    def widen(img: np.ndarray) -> np.ndarray:
        full = convolve_full(img, kernel)
        size = min(full.shape[0], img.shape[0] + 2 * (kernel.shape[0] // 2)) | 1
        start = (full.shape[0] - size) // 2
        return full[start:start + size, start:start + size]

    if isinstance(psf, PolynomialPsf):
        coeffs = np.stack([widen(c) for c in psf.coefficients])
        return PolynomialPsf(psf.width, psf.height, coeffs, psf.order)
    grid = psf.to_grid() if hasattr(psf, "to_grid") else GridPsf(
        np.array([(shape[1] - 1) / 2]), np.array([(shape[0] - 1) / 2]),
        psf.image_at((shape[1] - 1) / 2, (shape[0] - 1) / 2)[None, None])
    images = np.stack([[widen(img) for img in row] for row in grid.images])
    return GridPsf(grid.nodes_x, grid.nodes_y, images)


def _psf_through_kernel(psf: Psf, kernels: list[np.ndarray], phi: np.ndarray | None,
                        ksum: float, shape: tuple[int, int], nodes: tuple[int, int] = (3, 5)
                        ) -> GridPsf:
    """PSF of a science point source on a convolve-science difference: the science PSF through
    the spatially varying kernel (evaluated at each grid node) and the decorrelation filter."""
    height, width = shape
    xs = np.linspace(0, width - 1, nodes[0])
    ys = np.linspace(0, height - 1, nodes[1])
    rows = []
    for y in ys:
        row = []
        for x in xs:
            u = (x - (width - 1) / 2) / (width / 2)
            v = (y - (height - 1) / 2) / (height / 2)
            kernel = kernels[0] + (u * kernels[1] + v * kernels[2] if len(kernels) > 1 else 0)
            image = convolve_full(psf.image_at(x, y), kernel / ksum)
            if phi is not None:
                image = convolve_full(image, phi)
            row.append(image)
        rows.append(row)
    return GridPsf(xs, ys, np.array(rows))


def _subtract_residual_background(diff: np.ndarray, sky: np.ndarray, mesh: int) -> None:
    """Subtract from ``diff`` (C-contiguous float32, in place) its smooth background, measured
    on its ``sky`` pixels (sep meshes on binned pixels, 3x3 median filter)."""
    height, width = diff.shape
    subtract_binned_background(diff, ~sky, min(mesh, height, width), 3)


def residual_footprint_ratio(diff: np.ndarray, variance: np.ndarray, ix: np.ndarray,
                             iy: np.ndarray, half: int) -> float:
    """Median over stars of the rms of D / sqrt(V) in a (2 half + 1)^2 box on each star.

    1 when the stars subtract down to the noise; a poor kernel leaves it well above 1.
    """
    if ix.size == 0:
        return float("nan")
    d = boxes(diff, ix, iy, half).astype(np.float64)
    v = boxes(variance, ix, iy, half).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        z2 = np.where(np.isfinite(v) & (v > 0), d * d / v, np.nan)
    return float(np.nanmedian(np.sqrt(np.nanmean(z2, axis=(1, 2)))))


def _inverse_in_place(spectrum: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``irfft2(spectrum, s=shape)`` that overwrites ``spectrum`` with its transform along y
    instead of copying it first (``irfft2`` makes a temporary as large as the spectrum)."""
    sfft.ifft(spectrum, axis=0, overwrite_x=True)
    return sfft.irfft(spectrum, n=shape[1], axis=1)


def _matched_difference(target: np.ndarray, ref: np.ndarray, kernel: MatchingKernel,
                        u_var: float, c_var: float, decorrelate: bool,
                        warps: tuple[str | None, str | None] = (None, None)) -> np.ndarray:
    """``phi * (target - K(u, v) * ref)`` (phi the decorrelation filter, or 1), in float32.

    ``u_var``, ``c_var`` are the white-noise variances of target and ref, ``warps`` their warp
    kernels (None for images on their own grid).

    One forward FFT per image and one inverse FFT per spatial term of the kernel: the filter
    is applied in Fourier space before the spatial terms are recombined, which is exact for the
    constant term and, for the linear terms, off by phi's first moment over the image size
    (~1e-3 of an already small correction).
    """
    height, width = target.shape
    # No padding for the kernel: what its circular convolution wraps around lands within its
    # half-width of the border, masked EDGE as undefined anyway (with padding, the pixels
    # beyond the border were zeros, no better). A 4096-pixel side then keeps its fastest
    # transform length (0.23 s against 0.31 s for 4320 per transform pair, 2 cores).
    shape = (sfft.next_fast_len(height, real=True), sfft.next_fast_len(width, real=True))
    fr = sfft.rfft2(ref, s=shape)
    fk0 = centred_kernel_spectrum(kernel.kernels[0], shape)
    phi = None
    if decorrelate:
        ksum = kernel.ksum
        power = np.abs(fk0)
        power *= power
        phi = decorrelation_filter(power, ksum, u_var, c_var, _warp_power(warps[0], shape, True),
                                   _warp_power(warps[1], shape, True), overwrite_power=True)
    acc = sfft.rfft2(target, s=shape)
    fk0 *= fr
    acc -= fk0
    del fk0
    if phi is not None:
        acc *= phi
    out = _inverse_in_place(acc, shape)[:height, :width]
    del acc
    coords = (((np.arange(width, dtype=np.float32) - np.float32((width - 1) / 2))
               / np.float32(width / 2))[None, :],
              ((np.arange(height, dtype=np.float32) - np.float32((height - 1) / 2))
               / np.float32(height / 2))[:, None])
    for term, coord in zip(kernel.kernels[1:], coords, strict=False):
        product = centred_kernel_spectrum(term, shape)
        product *= fr
        if phi is not None:
            product *= phi
        term_image = _inverse_in_place(product, shape)[:height, :width]
        del product
        term_image *= coord
        out -= term_image
    return np.ascontiguousarray(out)  # frees the padding, and later stages work in place


def _zero_where(image: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """``image`` with the ``missing`` pixels zeroed: a copy only when some are missing."""
    return np.where(missing, np.float32(0), image) if missing.any() else image


def _sampled(array: np.ndarray, step: int = 4) -> np.ndarray:
    """Every ``step``-th pixel in both directions: robust statistics of a million pixels are
    as good as of sixteen million."""
    return array[::step, ::step]


@dataclass
class _PixelClasses:
    """What AL needs to know of the pixels besides the kernel (see :func:`_pixel_classes`)."""

    no_data_target: np.ndarray
    no_data_ref: np.ndarray
    #: Missing in the target, or within the kernel's reach of a missing convolved pixel.
    no_data: np.ndarray
    #: Within the kernel's reach of the border: the matched image is undefined there.
    edge: np.ndarray
    #: Pixels the residual background is measured on (None when it is not).
    sky: np.ndarray | None
    #: White-noise variances of the target and of the image convolved.
    target_var: float
    ref_var: float


def _pixel_classes(science: Exposure, template: Exposure, convolve_template: bool,
                   half: int, factors: tuple[float, float], with_sky: bool) -> _PixelClasses:
    """Missing, edge and sky pixels and the white-noise levels of an AL difference whose
    kernel has half-width ``half`` (``factors``: the variance planes' excess over white noise,
    target's then convolved image's). The output mask is made later: made now, it would add
    its 64 MB to the transforms' peak."""
    target, ref = (science, template) if convolve_template else (template, science)
    height, width = science.shape
    no_data_t = target.mask.is_set("NO_DATA")
    no_data_r = ref.mask.is_set("NO_DATA")
    good = ~(science.mask.is_set(["NO_DATA", "SAT", "BAD"])
             | template.mask.is_set(["NO_DATA", "SAT", "BAD"]))
    target_var = float(np.median(_sampled(target.variance)[_sampled(good)])) / factors[0]
    ref_var = float(np.median(_sampled(ref.variance)[_sampled(good)])) / factors[1]
    edge = np.ones(science.shape, bool)
    edge[half:height - half, half:width - half] = False
    no_data = no_data_t | (grow_square(no_data_r, half) if no_data_r.any() else no_data_r)
    sky = None
    if with_sky:
        # Sources found before injection are DETECTED; injected fakes carry their own planes.
        busy = ["DETECTED", "CR", "INJECTED", "INJECTED_TEMPLATE"]
        sky = good & ~edge & ~no_data & ~(science.mask.is_set(busy) | template.mask.is_set(busy))
    return _PixelClasses(no_data_t, no_data_r, no_data, edge, sky, target_var, ref_var)


def al_subtract(science: Exposure, template: Exposure, config: AlConfig | None = None,
                candidates: Columns | None = None) -> DiffimResult:
    """Difference ``science - matched template`` in science flux units, decorrelated.

    Both exposures must be on the same pixel grid, background-subtracted, with PSF models and
    variance planes. The sharper image is convolved (Rubin's ``auto`` choice). ``candidates``
    (x, y, snr of static sources, e.g. from characterization) saves a detection pass; by default
    the unconvolved image is searched.

    Raises
    ------
    StageError
        Too few clean kernel candidates (the message gives the count found).
    """
    config = config or AlConfig()
    if science.shape != template.shape:
        raise StageError(f"AL: science {science.shape} and template {template.shape} differ "
                         "in shape; warp the template first")
    if science.psf is None or template.psf is None:
        raise StageError("AL: both images need a PSF model")
    height, width = science.shape
    cx, cy = (width - 1) / 2, (height - 1) / 2
    fwhm_s, fwhm_t = science.psf.fwhm_at(cx, cy), template.psf.fwhm_at(cx, cy)
    convolve_template = fwhm_t <= fwhm_s
    target, ref = (science, template) if convolve_template else (template, science)
    sig_t = max(fwhm_s, fwhm_t) / SIGMA_TO_FWHM
    sig_r = min(fwhm_s, fwhm_t) / SIGMA_TO_FWHM
    sigma_match = float(np.sqrt(max(sig_t**2 - sig_r**2, 0.5**2)))
    sigmas = [max(0.4, f * sigma_match) for f in config.basis_sigma_factors]
    size = int(np.clip(2 * np.ceil(3 * max(sigmas)) + 1, config.min_kernel_size,
                       config.max_kernel_size)) | 1
    half = size // 2
    basis = gaussian_poly_basis(sigmas, config.basis_degrees, half)
    stamp_half = half + int(np.ceil(max(fwhm_s, fwhm_t)))
    # A warped image's variance plane is per pixel; the white noise it came from had more
    # (the warp moved the rest into correlations): the decorrelation and the difference's
    # variance use the white-noise level and the warp's noise spectrum.
    warps = (warp_kernel(target), warp_kernel(ref))
    factors = (_variance_factor(warps[0]), _variance_factor(warps[1]))
    # The pixels' classes and noise levels need no kernel: found in a second thread (when the
    # caller's cores allow) while this one chooses the stars and fits it.
    with beside(core_budget(), _pixel_classes, science, template, convolve_template, half,
                factors, config.residual_background_mesh is not None) as classes:
        if candidates is None:
            candidates = find_bright_sources(target)  # x, y, snr found on binned pixels
        ix, iy = select_candidates(candidates, target, ref, stamp_half + half, stamp_half,
                                   config.candidate_min_snr, config.candidate_max_snr,
                                   config.cell_size, config.per_cell, config.max_candidates)
        require_candidates(ix.size, config.min_candidates, config.candidate_min_snr,
                           config.candidate_max_snr)
        # Small images hold few stars: then the kernel and background cannot vary spatially.
        few = ix.size < config.min_spatial_candidates
        kernel = fit_kernel(target, ref, ix, iy, basis, stamp_half,
                            0 if few else config.spatial_order,
                            0 if few else config.background_order,
                            config.clip_sigma, config.n_clip, config.min_candidates)
        pixels = classes.result()
    ksum = kernel.ksum
    u_var, c_var = pixels.target_var, pixels.ref_var
    diff = _matched_difference(_zero_where(target.image, pixels.no_data_target),
                               _zero_where(ref.image, pixels.no_data_ref),
                               kernel, u_var, c_var, config.decorrelate, warps)
    uu = ((np.arange(width, dtype=np.float32) - np.float32(cx)) / np.float32(width / 2))[None, :]
    vv = ((np.arange(height, dtype=np.float32) - np.float32(cy))
          / np.float32(height / 2))[:, None]
    _subtract_background(diff, uu, vv, kernel.background.astype(np.float32))

    no_data = pixels.no_data
    if pixels.sky is not None:
        _subtract_residual_background(diff, pixels.sky, config.residual_background_mesh)
    psf = science.psf
    if config.decorrelate:
        phi = decorrelation_kernel(kernel.kernels[0], u_var, c_var, 2 * size + 1, *warps)
        variance = _weighted_sum(target.variance, np.float32(1 / factors[0]), ref.variance,
                                 np.float32(ksum**2 / factors[1]))
    else:
        phi = None
        ref_var = np.where(np.isfinite(ref.variance), ref.variance, 0)
        variance = target.variance + convolve_same(ref_var, [kernel.kernels[0]**2])[0]
    if convolve_template:
        if phi is not None:
            psf = _convolve_psf(science.psf, phi, science.shape)
    else:
        # D = (K * S - T) / kSum: a science point source appears through K (and phi).
        diff *= np.float32(-1.0 / ksum)
        variance *= np.float32(1.0 / ksum**2)
        psf = _psf_through_kernel(science.psf, kernel.kernels, phi, ksum, science.shape)

    # Both inputs use the default plane map; injected sources keep their INJECTED (science)
    # and INJECTED_TEMPLATE (template) bits.
    mask = Mask(science.mask.array | template.mask.array, science.mask.planes)
    mask.set("NO_DATA", no_data)
    mask.set("EDGE", pixels.edge)
    diff[no_data] = 0.0
    variance = variance.astype(np.float32, copy=False)
    variance[no_data] = np.inf
    out = Exposure(diff.astype(np.float32, copy=False), variance, mask, psf=psf,
                   wcs=science.wcs, photo_calib=science.photo_calib,
                   visit_info=science.visit_info, detector_info=science.detector_info)
    used = kernel.used
    quality = {
        "kernel_sum": ksum,
        # The kernel sum at the image corners (u, v = +-1) against the centre: the
        # photometric scaling's spatial variation.
        "kernel_sum_variation": float(np.ptp(kernel.corner_sums()) / abs(ksum)),
        "residual_footprint_ratio": residual_footprint_ratio(
            out.image, variance, ix[used], iy[used], int(np.ceil(max(fwhm_s, fwhm_t)))),
        "condition_number": kernel.condition,
        "n_unconstrained_terms": float(kernel.n_unconstrained),
        "n_kernel_candidates": float(ix.size),
        "n_kernel_used": float(used.sum()),
        "convolved": 0.0 if convolve_template else 1.0,
        "kernel_size": float(size),
    }
    return DiffimResult(out, quality, kernel.kernels[0])
