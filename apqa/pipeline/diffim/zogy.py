"""ZOGY image subtraction of aligned exposures (Zackay, Ofek & Gal-Yam 2016, ApJ 830, 27).

With N the science ("new") image, R the template ("reference"), P_n and P_r their PSFs, F_n and
F_r their flux zero points and sigma_n, sigma_r their background noise, the paper's proper
difference image, its PSF and its flux zero point are (hats are Fourier transforms)::

    D_hat   = (F_r P_r_hat N_hat - F_n P_n_hat R_hat) / den,
    den     = sqrt(sigma_n^2 F_r^2 |P_r_hat|^2 + sigma_r^2 F_n^2 |P_n_hat|^2),
    P_D_hat = F_r F_n P_r_hat P_n_hat / (F_D den),
    F_D     = F_r F_n / sqrt(sigma_n^2 F_r^2 + sigma_r^2 F_n^2),

and the score image is the matched filter ``S = F_D D (x) P_D(-x)``. D has white noise of unit
variance for background-limited images, so it needs no decorrelation afterwards, and the
kernels are bounded (``|F_r P_r_hat / den| <= 1 / sigma_n``): no deconvolution ever blows up
whichever image is sharper.

Units. Here F_n = 1 and F_r = ``flux_ratio``, the template counts of a source per science count
(``science.calibration_mean / template.calibration_mean``). The returned difference is
``D / F_D``: a transient of ``f`` science counts has PSF flux ``f`` on it with the returned PSF
P_D (which sums to 1), and the science's photometric calibration applies to it.

Variance. D is a linear filter of the two images, ``D = k_dn (x) N - k_dr (x) R``, so its
per-pixel variance is ``V_n (x) k_dn^2 + V_r (x) k_dr^2`` with the inputs' variance planes: one
in the paper's normalization for constant background noise, and correctly modulated where the
variance planes vary (bright stars, vignetting, a template stacked from fewer visits). The score
is normalized the same way (the paper's source-noise correction, eqs. 26-29, which here uses
the full variance planes, background included, convolved with the squared score kernels), plus
optionally the astrometric-registration term (eqs. 30-33), giving S_corr in Gaussian sigma.

Ringing. FFT convolution is circular and ZOGY's kernels are ratios of transforms; these are
the mitigations, each explained where it is done:

* zero padding by at least the kernel half-width, so nothing wraps around onto the image
  (:func:`_padded_shape`);
* a raised-cosine taper at the image edges and around masked pixels, which are set to 0 in both
  images after background subtraction, so no step in either image is convolved with two
  different PSFs (:func:`_taper_weights`); the tapered zone is masked EDGE in the output;
* PSF kernels placed with their centre pixel exactly at pixel (0, 0) of the FFT grid, and
  optionally re-centred on their windowed centroid (:func:`_psf_kernel`, :func:`_embed_centred`):
  a PSF off by half a pixel turns every star into a dipole;
* kernels computed in float64 on a small grid, with the denominator regularized by a tiny
  epsilon where both PSF transforms vanish (:func:`_zogy_kernels`), then applied in float32.

Flux ratio. F_r / F_n comes from ``ZogyConfig.flux_ratio`` when set, else from a robust fit on
bright stars (:func:`_fit_flux_ratio`: the ratio of the two images cross-convolved to a common
PSF, which is what makes constant stars vanish and is immune to blends and centroid errors),
else from the photometric calibrations.

Spatially varying PSFs. The image is cut into tiles of about ``tile_size`` pixels (1024 by
default; ``None`` for one PSF pair at the image centre). Each tile is subtracted with the PSFs
at its centre on a region reaching the kernel radius past the blending zone, so it sees
complete data, and neighbouring tiles are blended with raised-cosine weights over 64 pixels.
The difference PSF is a :class:`GridPsf` with a node at every tile centre. The smaller FFTs
make this no slower than one image-sized FFT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from pydantic import Field
from scipy import fft as sfft
from scipy import ndimage, signal
from scipy.spatial import cKDTree

from apqa.config import ConfigModel
from apqa.datamodel import Exposure, GridPsf, Mask, Psf, measure_fwhm, shift_kernels
from apqa.errors import InputError, StageError
from apqa.log import get_logger

log = get_logger(__name__)

SIGMA_TO_FWHM = 2.3548
#: Pixels whose taper weight is below this are masked EDGE in the difference image.
_TAPER_MASK_LEVEL = 0.99
#: Pixels with at least this taper weight count as untapered for statistics.
_UNTAPERED = 0.999
#: Statistics (medians, robust widths) use at most about this many pixels.
_MAX_STAT_PIXELS = 1_000_000
_MIN_STAT_PIXELS = 1000
#: Half-width (pixels) of the blending ramps between tiles.
_TILE_BLEND = 32
#: Largest automatic half-width of the ZOGY kernels (pixels).
_MAX_KERNEL_RADIUS = 128
#: The difference variance is rescaled to the measured noise only within this range.
_RESCALE_RANGE = (0.5, 2.0)


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
    workers: int = Field(-1, description="scipy.fft workers (-1: all cores)")


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
        noise (and astrometric noise when configured); 0 on masked pixels.
    score_psf
        The score's response to a point source (P_D autocorrelation), odd-sized, centred,
        peak 1.
    flux_ratio
        F_r / F_n used: template counts per science count of the same source.
    quality
        Diagnostics; see :func:`zogy_subtract`.
    """

    difference: Exposure
    score: np.ndarray
    score_psf: np.ndarray
    flux_ratio: float
    quality: dict[str, float] = field(default_factory=dict)


@dataclass
class _Kernels:
    """Real-space ZOGY kernels, centred and odd-sized, for D (science units) and for S."""

    d_science: np.ndarray   # k_dn: D = k_dn (x) N - k_dr (x) R
    d_template: np.ndarray  # k_dr
    psf_d: np.ndarray       # P_D
    s_science: np.ndarray   # k_sn = k_dn (x) P_D(-x): S = k_sn (x) N - k_sr (x) R
    s_template: np.ndarray  # k_sr
    score_psf: np.ndarray   # P_D (x) P_D(-x), peak 1
    flux_zero_point: float  # F_D
    truncation: float       # largest fraction of a kernel's sum of squares lost by the crop
    radius: int             # half-width of the D and S kernels


def _robust_std(values: np.ndarray) -> float:
    """Gaussian-equivalent width from the median absolute deviation."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def _sample(selection: np.ndarray) -> tuple[slice, slice]:
    """A regular pixel stride keeping statistics on about ``_MAX_STAT_PIXELS`` pixels."""
    step = max(1, int(math.sqrt(selection.size / _MAX_STAT_PIXELS)))
    return slice(None, None, step), slice(None, None, step)


def _bad_pixels(exposure: Exposure, planes: list[str]) -> np.ndarray:
    """Pixels not to use: any of ``planes`` set (if the mask has them) or non-finite values."""
    known = [p for p in planes if p in exposure.mask.planes]
    bad = exposure.mask.is_set(known) if known else np.zeros(exposure.shape, bool)
    bad |= ~np.isfinite(exposure.image)
    bad |= ~np.isfinite(exposure.variance) | (exposure.variance < 0)
    return bad


def _windowed_centroid(kernel: np.ndarray, sigma: float) -> tuple[float, float]:
    """Gaussian-windowed centroid of a kernel relative to its central pixel (SExtractor XWIN).

    The window makes the estimate follow the core, as centroids measured on the images do, so
    wings (or an asymmetric halo) do not pull it.
    """
    half = kernel.shape[0] // 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float64)
    cx = cy = 0.0
    for _ in range(30):
        w = kernel * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
        total = w.sum()
        if not total > 0:
            return 0.0, 0.0
        dx = 2.0 * float((w * (xx - cx)).sum() / total)
        dy = 2.0 * float((w * (yy - cy)).sum() / total)
        cx, cy = cx + dx, cy + dy
        if abs(dx) < 1e-6 and abs(dy) < 1e-6:
            break
    return cx, cy


def _psf_kernel(psf: Psf, x: float, y: float, recenter: bool, name: str
                ) -> tuple[np.ndarray, float, tuple[float, float]]:
    """The PSF at (x, y) as a float64 kernel summing to 1, its FWHM and any centring shift.

    ``image_at`` promises a kernel centred on its central pixel. With ``recenter`` its windowed
    centroid is measured and, if it is off by more than 1e-3 px, the kernel is shifted (Fourier
    phase ramp) to put it exactly there: both images were registered on their stars' centroids,
    so any offset between the two PSF models would leave a dipole on every star.
    """
    kernel = np.asarray(psf.image_at(x, y), np.float64)
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0:
        raise InputError(f"{name}.psf: image_at must return an odd-sized square kernel, "
                         f"got shape {kernel.shape}")
    total = kernel.sum()
    if not np.isfinite(total) or total <= 0:
        raise InputError(f"{name}.psf: kernel at ({x:.1f}, {y:.1f}) does not have a positive "
                         "finite sum")
    kernel = kernel / total
    fwhm = measure_fwhm(kernel)
    if not np.isfinite(fwhm):
        # HSM failed (odd shapes): fall back to the second moments of the kernel.
        half = kernel.shape[0] // 2
        yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
        fwhm = SIGMA_TO_FWHM * float(np.sqrt(0.5 * (kernel * (xx**2 + yy**2)).sum()))
    shift = (0.0, 0.0)
    if recenter:
        cx, cy = _windowed_centroid(kernel, fwhm / SIGMA_TO_FWHM)
        if math.hypot(cx, cy) > 1e-3:
            kernel = shift_kernels(kernel[None].astype(np.float32), np.array([-cx]),
                                   np.array([-cy]))[0].astype(np.float64)
            kernel /= kernel.sum()
            shift = (-cx, -cy)
    return kernel, float(fwhm), shift


def _embed_centred(kernel: np.ndarray, shape: tuple[int, int],
                   dtype: type = np.float32) -> np.ndarray:
    """Put an odd, centred kernel on an FFT grid with its centre pixel at index (0, 0).

    This is ``ifftshift`` of the kernel zero-padded to ``shape``: the kernel's negative offsets
    wrap to the far ends, so its transform has no linear phase (no sub-pixel shift) at all.
    """
    size = kernel.shape[0]
    half = size // 2
    if size > shape[0] or size > shape[1]:
        raise StageError(f"kernel of size {size} does not fit the FFT grid {shape}")
    out = np.zeros(shape, dtype)
    out[:half + 1, :half + 1] = kernel[half:, half:]
    out[:half + 1, shape[1] - half:] = kernel[half:, :half]
    out[shape[0] - half:, :half + 1] = kernel[:half, half:]
    out[shape[0] - half:, shape[1] - half:] = kernel[:half, :half]
    return out


def _kernel_spectrum(kernel: np.ndarray, shape: tuple[int, int], workers: int) -> np.ndarray:
    """``rfft2(_embed_centred(kernel, shape))`` at about half the cost.

    Only the kernel's few rows are non-zero, so the row transforms are done on those alone
    before the full-length column transforms.
    """
    size = kernel.shape[0]
    half = size // 2
    if size > shape[0] or size > shape[1]:
        raise StageError(f"kernel of size {size} does not fit the FFT grid {shape}")
    rows = np.zeros((size, shape[1]), np.float32)
    rows[:, :half + 1] = kernel[:, half:]
    rows[:, shape[1] - half:] = kernel[:, :half]
    rows_hat = sfft.rfft(rows, axis=1, workers=workers)
    out = np.zeros((shape[0], rows_hat.shape[1]), np.complex64)
    out[:half + 1] = rows_hat[half:]
    out[shape[0] - half:] = rows_hat[:half]
    return sfft.fft(out, axis=0, workers=workers, overwrite_x=True)


def _centred_crop(periodic: np.ndarray, size: int) -> np.ndarray:
    """The inverse of :func:`_embed_centred`: an odd ``size`` kernel centred on its middle."""
    half = size // 2
    rows = np.r_[periodic.shape[0] - half:periodic.shape[0], 0:half + 1]
    cols = np.r_[periodic.shape[1] - half:periodic.shape[1], 0:half + 1]
    return periodic[np.ix_(rows, cols)]


def _outside_power(kernel: np.ndarray) -> np.ndarray:
    """Fraction of a periodic kernel's sum of squares outside each half-width r = 0, 1, ...

    ``kernel`` has its origin at index (0, 0) (FFT layout); distances are Chebyshev (square
    crops).
    """
    dy = np.minimum(np.arange(kernel.shape[0]), kernel.shape[0] - np.arange(kernel.shape[0]))
    dx = np.minimum(np.arange(kernel.shape[1]), kernel.shape[1] - np.arange(kernel.shape[1]))
    dist = np.maximum(dy[:, None], dx[None, :])
    power = np.bincount(dist.ravel(), weights=(kernel**2).ravel())
    return 1.0 - np.cumsum(power) / power.sum()


def _zogy_kernels(psf_science: np.ndarray, psf_template: np.ndarray, sigma_science: float,
                  sigma_template: float, flux_ratio: float, epsilon: float,
                  radius: int | None, tolerance: float, max_radius: int,
                  psf_size: int) -> _Kernels:
    """ZOGY's kernels in real space, from the two PSFs, noise levels and flux ratio.

    They are computed in float64 on a grid of about four times ``max_radius``, where the
    transforms of both PSFs keep their full dynamic range, then cropped to ``2 radius + 1``
    pixels; with ``radius`` None, to the smallest half-width that keeps all but
    ``tolerance`` of every kernel's power. PSF models cut by their stamp's edge have
    transforms that ripple, and kernels whose tails fall only as a power of the distance
    (a few 1e-3 of their power beyond the stamp size for fitted PSFs): cropped too tightly
    they leave rings around bright stars. Cropped D kernels are rescaled to their exact sums,
    so fluxes are conserved and constant stars leave no net flux whatever the crop.

    Far from the origin of Fourier space both PSF transforms fall towards rounding noise; the
    ratio of two rounding errors would put random structure into the kernels, so ``den^2``
    gets ``epsilon`` times its zero-frequency value added, which rolls the kernels off
    smoothly where neither image holds any signal.
    """
    m = sfft.next_fast_len(4 * max_radius + 2, real=True)
    pn = sfft.rfft2(_embed_centred(psf_science, (m, m), np.float64))
    pr = sfft.rfft2(_embed_centred(psf_template, (m, m), np.float64))
    fr, sn2, sr2 = flux_ratio, sigma_science**2, sigma_template**2
    den2_0 = sn2 * fr**2 + sr2
    den = np.sqrt(sn2 * fr**2 * np.abs(pr) ** 2 + sr2 * np.abs(pn) ** 2 + epsilon * den2_0)
    f_d = fr / math.sqrt(den2_0)
    # Science units: the paper's D divided by F_D (F_n = 1), so fluxes are science counts.
    kdn_hat = fr * pr / (f_d * den)
    kdr_hat = pn / (f_d * den)
    pd_hat = fr * pr * pn / (f_d * den)
    # The score up to the constant F_D^2, which cancels in S_corr: S = D (x) P_D(-x).
    pd_conj = np.conj(pd_hat)
    specs = {"d_science": kdn_hat, "d_template": kdr_hat, "psf_d": pd_hat,
             "s_science": kdn_hat * pd_conj, "s_template": kdr_hat * pd_conj,
             "score_psf": pd_hat * pd_conj}
    full = {name: sfft.irfft2(spec, s=(m, m)) for name, spec in specs.items()}
    names = ("d_science", "d_template", "s_science", "s_template")
    outside = np.max([_outside_power(full[n])[:max_radius + 1] for n in names], axis=0)
    if radius is None:
        fits = np.nonzero(outside <= tolerance)[0]
        radius = int(fits[0]) if fits.size else max_radius
        radius = max(radius, psf_size // 2)
    radius = min(radius, max_radius)
    size = 2 * radius + 1
    cropped = {}
    for name in names:
        kernel = _centred_crop(full[name], size)
        # Exact sum: the transform at zero frequency.
        cropped[name] = kernel * (float(specs[name][0, 0].real) / kernel.sum())
    psf_d = _centred_crop(full["psf_d"], psf_size)
    psf_d = psf_d / psf_d.sum()
    score_psf = _centred_crop(full["score_psf"], psf_size)
    score_psf = score_psf / score_psf[psf_size // 2, psf_size // 2]
    return _Kernels(cropped["d_science"], cropped["d_template"], psf_d, cropped["s_science"],
                    cropped["s_template"], score_psf, f_d, max(float(outside[radius]), 0.0),
                    radius)


def _padded_shape(shape: tuple[int, int], pad: int) -> tuple[int, int]:
    """FFT grid: the image plus ``pad`` zero pixels along each axis, rounded to a fast length.

    Circular convolution with a kernel of half-width h wraps pixels no further than h, so with
    ``pad >= h`` the zeros, not the opposite edge of the image, are what wraps onto the image.
    """
    return _fast_even(shape[0] + pad), _fast_even(shape[1] + pad)


def _fast_even(n: int) -> int:
    """Smallest even length >= n that pocketfft transforms fast.

    pocketfft is fast for lengths with factors 2, 3, 5, 7 and 11 (``real=True`` would allow
    only 2, 3 and 5 and pad 4096 + 41 to 4320 instead of 4158). Even lengths let the smoothed
    detection images be computed on every second pixel (:func:`_smoothed_half`).
    """
    n = sfft.next_fast_len(n)
    while n % 2:
        n = sfft.next_fast_len(n + 1)
    return n


def _padded_product(values: np.ndarray, weights: np.ndarray, bad: np.ndarray,
                    pshape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``values * weights`` (0 on bad pixels) in a zero-padded FFT buffer of ``pshape``.

    Returns (view of the image part, whole buffer); building the product in place saves the
    copy that ``rfft2(..., s=pshape)`` would make.
    """
    buf = np.zeros(pshape, np.float32)
    view = buf[:values.shape[0], :values.shape[1]]
    np.multiply(values, weights, out=view)
    np.copyto(view, np.float32(0), where=bad)  # after the product: NaN * 0 stays NaN
    return view, buf


def _edge_ramp(n: int, width: int) -> np.ndarray:
    """1-d raised-cosine window: 0 -> 1 over ``width`` pixels at both ends, 1 in between."""
    ramp = np.ones(n, np.float32)
    width = min(width, n // 2)
    if width > 0:
        t = (np.arange(width, dtype=np.float64) + 0.5) / width
        up = (0.5 - 0.5 * np.cos(np.pi * t)).astype(np.float32)
        ramp[:width] = up
        ramp[n - width:] = up[::-1]
    return ramp


def _taper_weights(shape: tuple[int, int], bad: np.ndarray, width: int) -> np.ndarray:
    """Weights applied to both images before the FFTs: 0 on bad pixels, 1 far from them.

    ZOGY convolves the science with P_r and the template with P_n. Where the data stop (the
    image edge, a NO_DATA block, a masked bleed trail) both images have a step, and the two
    convolutions blur it differently: any background residual or source cut by the step leaves
    an edge-shaped residual, and the sharp step excites every spatial frequency of the kernels
    (ringing). Multiplying both images by the same smooth weight (a raised cosine from 0 at the
    edge to 1 at ``width`` pixels inside) removes the step. Near masked pixels the weight is a
    raised cosine of the local fraction of good pixels in a ``2 width + 1`` box, which falls
    from 1 at ``width`` pixels from a masked region to ~0 at its boundary; isolated masked
    pixels barely change their neighbours. The noise stays correctly described: the variance
    planes are multiplied by the squared weights.
    """
    weights = _edge_ramp(shape[0], width)[:, None] * _edge_ramp(shape[1], width)[None, :]
    if width > 0 and bad.any():
        # Only tiles near masked pixels need the box filter (a full-image filter costs
        # ~0.3 s at 4096^2 for what is usually a few small regions).
        tile = max(256, 2 * width)
        ny, nx = -(-shape[0] // tile), -(-shape[1] // tile)
        flags = np.zeros((ny * tile, nx * tile), bool)
        flags[:shape[0], :shape[1]] = bad
        flags = flags.reshape(ny, tile, nx, tile).any(axis=(1, 3))
        flags = ndimage.binary_dilation(flags, np.ones((3, 3), bool))
        for ty, tx in zip(*np.nonzero(flags), strict=True):
            y0, y1 = ty * tile, min((ty + 1) * tile, shape[0])
            x0, x1 = tx * tile, min((tx + 1) * tile, shape[1])
            ey0, ey1 = max(0, y0 - width), min(shape[0], y1 + width)
            ex0, ex1 = max(0, x0 - width), min(shape[1], x1 + width)
            good = ndimage.uniform_filter((~bad[ey0:ey1, ex0:ex1]).astype(np.float32),
                                          size=2 * width + 1, mode="nearest")
            s = np.clip(2.0 * good[y0 - ey0:y1 - ey0, x0 - ex0:x1 - ex0] - 1.0, 0.0, 1.0)
            weights[y0:y1, x0:x1] *= 0.5 - 0.5 * np.cos(np.pi * s)
    weights[bad] = 0.0
    return weights.astype(np.float32, copy=False)


def _gaussian_transfer(shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Transform of a unit-sum Gaussian on the rfft grid of ``shape`` (real, float32)."""
    fy = sfft.fftfreq(shape[0])
    fx = sfft.rfftfreq(shape[1])
    gy = np.exp(-2.0 * (np.pi * sigma * fy) ** 2).astype(np.float32)
    gx = np.exp(-2.0 * (np.pi * sigma * fx) ** 2).astype(np.float32)
    return gy[:, None] * gx[None, :]


def _smoothed_half(image_hat: np.ndarray, pshape: tuple[int, int], shape: tuple[int, int],
                   fwhm: float, stat: np.ndarray, workers: int) -> np.ndarray:
    """The image smoothed by a Gaussian of the PSF's FWHM, on every second pixel, in S/N units.

    The Gaussian (sigma at least 2 px) suppresses frequencies above 1/4 cycle per pixel by a
    factor of 200 or more, so the smoothed image is sampled without aliasing at half the
    resolution: its transform is the central quarter of the full one, inverted at a quarter
    of the cost. Noise is measured robustly on the ``stat`` pixels. Only used to find sources
    (for the noise statistics' mask and the flux-ratio stars), where that is plenty.
    """
    sigma = max(fwhm / SIGMA_TO_FWHM, 2.0)
    half_shape = (pshape[0] // 2, pshape[1] // 2)
    n_pos = (half_shape[0] - 1) // 2 + 1  # fftfreq layout: non-negative rows, then negative
    rows = np.r_[0:n_pos, pshape[0] - (half_shape[0] - n_pos):pshape[0]]
    sub = image_hat[rows, :half_shape[1] // 2 + 1]
    # Sigma is in full-resolution pixels: half as many on the half-resolution grid.
    sub *= _gaussian_transfer(half_shape, sigma / 2)
    smooth = sfft.irfft2(sub, s=half_shape, workers=workers)
    smooth = smooth[:(shape[0] + 1) // 2, :(shape[1] + 1) // 2]
    stat_half = stat[::2, ::2]
    sl = _sample(stat_half)
    noise = _robust_std(smooth[sl][stat_half[sl]])
    if not noise > 0:
        raise StageError("zogy: no noise left in the smoothed image: is it constant or all "
                         "masked?")
    smooth /= np.float32(noise)
    return smooth


def _find_stars(snr_half: np.ndarray, usable: np.ndarray, threshold: float, fwhm: float,
                margin: int, max_stars: int) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution pixels of the brightest peaks of a half-resolution S/N map.

    Peaks are local maxima above ``threshold``; of two closer than 1 FWHM only the brighter is
    kept. A star must be ``margin`` pixels from the edges with no unusable pixel within
    ``margin``. Positions are good to a pixel, which is all the cross-convolution flux ratio
    needs (:func:`_fit_flux_ratio`).
    """
    height, width = usable.shape
    iy, ix = np.nonzero(snr_half[1:-1, 1:-1] > threshold)
    iy, ix = iy + 1, ix + 1
    if iy.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    value = snr_half[iy, ix]
    is_peak = np.ones(iy.size, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                is_peak &= value >= snr_half[iy + dy, ix + dx]
    order = np.argsort(-value[is_peak])
    y, x = 2 * iy[is_peak][order], 2 * ix[is_peak][order]
    inside = (y >= margin) & (y < height - margin) & (x >= margin) & (x < width - margin)
    y, x = y[inside], x[inside]
    if y.size > 1:
        keep = np.ones(y.size, bool)
        for i, j in cKDTree(np.column_stack([x, y])).query_pairs(fwhm):
            keep[max(i, j)] = False  # the fainter of the two (sorted by decreasing S/N)
        y, x = y[keep], x[keep]
    chosen: list[int] = []
    for i, (yi, xi) in enumerate(zip(y, x, strict=True)):
        if usable[yi - margin:yi + margin + 1, xi - margin:xi + margin + 1].all():
            chosen.append(i)
            if len(chosen) == max_stars:
                break
    return x[chosen], y[chosen]


def _cross_kernels(psf_science: np.ndarray, psf_template: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Filters giving both images the same PSF, each matched-filtered with it.

    ``K_n = P_r (x) Q(-x)`` and ``K_r = P_n (x) Q(-x)`` with ``Q = P_n (x) P_r``: N (x) K_n and
    R (x) K_r are the two images cross-convolved to the common PSF Q, smoothed by Q. Cropped
    where the outer frame holds less than 1e-6 of the kernel's absolute sum, and put on the
    same odd size.
    """
    q = signal.fftconvolve(psf_science, psf_template)
    flipped = q[::-1, ::-1]
    k_n = signal.fftconvolve(psf_template, flipped)
    k_r = signal.fftconvolve(psf_science, flipped)
    size = max(k_n.shape[0], k_r.shape[0])
    k_n, k_r = (np.pad(k, (size - k.shape[0]) // 2) for k in (k_n, k_r))
    half = size // 2
    total = np.abs(k_n).sum() + np.abs(k_r).sum()
    while half > 1:
        inner = slice(size // 2 - half + 1, size // 2 + half)
        outer = (np.abs(k_n).sum() - np.abs(k_n[inner, inner]).sum()
                 + np.abs(k_r).sum() - np.abs(k_r[inner, inner]).sum())
        if outer > 1e-6 * total:
            break
        half -= 1
    crop = slice(size // 2 - half, size // 2 + half + 1)
    return k_n[crop, crop], k_r[crop, crop]


def _fit_flux_ratio(science: np.ndarray, template: np.ndarray, var_science: np.ndarray,
                    var_template: np.ndarray, cross: list[tuple[np.ndarray, np.ndarray]],
                    group: np.ndarray, x: np.ndarray, y: np.ndarray, clip: float
                    ) -> tuple[float, float, int]:
    """F_r / F_n from the stars at pixels (x, y), on the cross-convolved images.

    Star ``i`` is filtered with the kernels ``cross[group[i]]`` (those of its tile, whose PSFs
    are the ones valid there).

    For constant sources ``R (x) P_n = (F_r / F_n) N (x) P_r`` holds pixel by pixel: it is the
    condition for them to vanish from D. So the ratio of the two filtered images
    (:func:`_cross_kernels`) at a star's peak is F_r / F_n whatever its neighbours, its exact
    centroid or its profile; PSF fluxes on the raw images are not, because blends and centroid
    errors bias the sharper and the broader image differently (0.2-0.5% in tests).

    Transients, variables and stars hit by defects in one image only are outliers, rejected
    by an iterative clip around the median in units of each ratio's expected error, with the
    error scale itself measured (PSF-model errors make bright stars scatter more than noise
    says). The estimate is then a weighted ratio of sums, ``sum(w a_r) / sum(w a_n)`` with
    weights from the errors alone: weights from the measured values would favour stars whose
    science value scattered up and bias the ratio low.

    Returns
    -------
    ratio, error, n_used
    """
    if x.size == 0:
        return float("nan"), float("nan"), 0
    an, ar, en, er = (np.full(x.size, np.nan) for _ in range(4))
    for g, (k_science, k_template) in enumerate(cross):
        sel = group == g
        if not sel.any():
            continue
        half = k_science.shape[0] // 2
        off = np.arange(-half, half + 1)
        wy = y[sel, None, None] + off[None, :, None]
        wx = x[sel, None, None] + off[None, None, :]
        # Correlation form: a(p) = sum_u image(p - u) K(u) = sum_v image(p + v) K(-v).
        kn = k_science[::-1, ::-1][None]
        kr = k_template[::-1, ::-1][None]
        an[sel] = (science[wy, wx] * kn).sum(axis=(1, 2))
        ar[sel] = (template[wy, wx] * kr).sum(axis=(1, 2))
        en[sel] = np.sqrt((var_science[wy, wx] * kn**2).sum(axis=(1, 2)))
        er[sel] = np.sqrt((var_template[wy, wx] * kr**2).sum(axis=(1, 2)))
    ok = np.isfinite(an) & np.isfinite(ar) & (an > 0) & (en > 0) & (er > 0)
    an, en, ar, er = an[ok], en[ok], ar[ok], er[ok]
    if an.size == 0:
        return float("nan"), float("nan"), 0
    ratio = ar / an
    keep = np.ones(ratio.size, bool)
    centre = float(np.median(ratio))
    scale = 1.0
    for _ in range(10):
        # Error of each ratio at the current estimate (a_r ~ centre a_n), not at its own value.
        sigma = np.sqrt(er**2 + (centre * en) ** 2) / an
        z = (ratio - centre) / sigma
        scale = max(1.0, 1.4826 * float(np.median(np.abs(z[keep]))))
        new_keep = np.abs(z) < clip * scale
        if new_keep.sum() == 0:
            break
        converged = np.array_equal(new_keep, keep)
        keep = new_keep
        centre = float(np.median(ratio[keep]))
        if converged:
            break
    weight = 1.0 / (er[keep] ** 2 + (centre * en[keep]) ** 2)
    total = float((weight * an[keep]).sum())
    mean = float((weight * ar[keep]).sum()) / total
    return mean, scale * math.sqrt(float(weight.sum())) / total, int(keep.sum())


def _output_mask(science: Mask, template: Mask, config: ZogyConfig) -> Mask:
    """Science planes OR template planes (by name; some template planes renamed)."""
    mask = science.copy()
    present = int(np.bitwise_or.reduce(template.array, axis=None))
    for name, bit in template.planes.items():
        if not present & (1 << bit):
            continue  # one pass over the mask instead of one per plane
        target = config.template_plane_renames.get(name, name)
        mask.add_plane(target)
        mask.set(target, (template.array & (1 << bit)) != 0)
    for name in config.clear_mask_planes:
        if name in mask.planes:
            mask.clear(name)
    return mask


def _check_inputs(science: Exposure, template: Exposure) -> None:
    if science.shape != template.shape:
        raise InputError(f"template: expected the science's shape {science.shape} (images must "
                         f"be aligned on the same pixel grid), got {template.shape}")
    for name, exp in (("science", science), ("template", template)):
        if exp.psf is None:
            raise InputError(f"{name}: exposure has no PSF model (ZOGY needs both PSFs)")
        if min(exp.shape) < 16:
            raise InputError(f"{name}: image of shape {exp.shape} is too small for ZOGY")


def _grow(mask: np.ndarray, radius: int, block: int = 4) -> np.ndarray:
    """Dilate ``mask`` by at least ``radius`` pixels, on blocks of ``block`` x ``block``.

    Working on blocks is 16 times cheaper than a pixel dilation (0.3 s at 4096^2) and only
    errs on the generous side, which a mask for noise statistics can afford.
    """
    ny, nx = -(-mask.shape[0] // block), -(-mask.shape[1] // block)
    blocks = np.zeros((ny * block, nx * block), bool)
    blocks[:mask.shape[0], :mask.shape[1]] = mask
    small = blocks.reshape(ny, block, nx, block).any(axis=(1, 3))
    reach = -(-radius // block)
    small = ndimage.maximum_filter(small.view(np.uint8), size=2 * reach + 1) > 0
    grown = np.repeat(np.repeat(small, block, axis=0), block, axis=1)
    return grown[:mask.shape[0], :mask.shape[1]]


def _source_pixels(mask_sources: np.ndarray | None, science: Exposure, template: Exposure,
                   snr_science: np.ndarray, snr_template: np.ndarray, threshold: float,
                   grow: int) -> np.ndarray:
    """Pixels belonging to sources, excluded from every noise statistic.

    ``mask_sources`` when given; otherwise pixels above ``threshold`` in either
    half-resolution S/N map, grown by ``grow`` pixels, plus the inputs' DETECTED planes.
    """
    if mask_sources is not None:
        sources = np.asarray(mask_sources, bool)
        if sources.shape != science.shape:
            raise InputError(f"mask_sources: expected shape {science.shape}, "
                             f"got {sources.shape}")
        return sources
    half = (snr_science > threshold) | (snr_template > threshold)
    half = _grow(half, -(-grow // 2), block=2)
    sources = np.repeat(np.repeat(half, 2, axis=0), 2, axis=1)[:science.shape[0],
                                                             :science.shape[1]]
    for exp in (science, template):
        planes = [p for p in ("DETECTED", "DETECTED_NEGATIVE") if p in exp.mask.planes]
        if planes:
            sources |= exp.mask.is_set(planes)
    return sources


def _initial_flux_ratio(science: Exposure, template: Exposure) -> float | None:
    """F_r/F_n from the photometric calibrations: a source of f nJy has f / c counts.

    So template counts per science count = c_science / c_template.
    """
    if science.photo_calib is None or template.photo_calib is None:
        return None
    return science.photo_calib.calibration_mean / template.photo_calib.calibration_mean


@dataclass
class _Tile:
    """The kernels of one tile and the largest PSF re-centring applied for them."""

    kernels: _Kernels
    shift: float


def _filter_region(buf_n: np.ndarray, buf_r: np.ndarray, buf_vn: np.ndarray, buf_vr: np.ndarray,
                   kernels: _Kernels, out_shape: tuple[int, int],
                   astrometric_sigma: tuple[float, float], workers: int,
                   n_hat: np.ndarray | None = None, r_hat: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """D, S (not yet normalized), var(D) and var(S) of one region.

    ``buf_*`` are the region's (weighted) images and variances, zero-padded to the FFT grid;
    they are overwritten. ``D = k_dn (x) N - k_dr (x) R``, ``S = D (x) P_D(-x)``, and the
    variances are the variance planes through the squared kernels.
    """
    fshape = buf_n.shape
    height, width = out_shape

    def spectrum(kernel: np.ndarray) -> np.ndarray:
        return _kernel_spectrum(kernel, fshape, workers)

    def crop(spec: np.ndarray, overwrite: bool = True) -> np.ndarray:
        return sfft.irfft2(spec, s=fshape, workers=workers,
                           overwrite_x=overwrite)[:height, :width]

    def filtered(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Transform of sum(kernel (x) image) over (kernel, image transform) pairs."""
        total = spectrum(pairs[0][0])
        total *= pairs[0][1]
        for kernel, image_hat in pairs[1:]:
            term = spectrum(kernel)
            term *= image_hat
            total += term
        return total

    if n_hat is None:
        n_hat = sfft.rfft2(buf_n, workers=workers, overwrite_x=True)
    if r_hat is None:
        r_hat = sfft.rfft2(buf_r, workers=workers, overwrite_x=True)
    d_hat = filtered([(kernels.d_science, n_hat), (-kernels.d_template, r_hat)])
    diff = crop(d_hat, overwrite=False)  # d_hat is needed again for the score
    pd_hat = spectrum(kernels.psf_d)
    np.conjugate(pd_hat, out=pd_hat)
    d_hat *= pd_hat
    del pd_hat
    score = crop(d_hat)
    del d_hat
    vn_hat = sfft.rfft2(buf_vn, workers=workers, overwrite_x=True)
    vr_hat = sfft.rfft2(buf_vr, workers=workers, overwrite_x=True)
    var_d = crop(filtered([(kernels.d_science**2, vn_hat), (kernels.d_template**2, vr_hat)]))
    var_s = crop(filtered([(kernels.s_science**2, vn_hat), (kernels.s_template**2, vr_hat)]))
    del vn_hat, vr_hat
    sigma_ast_n, sigma_ast_r = astrometric_sigma
    if sigma_ast_n > 0 or sigma_ast_r > 0:
        var_s += _astrometric_variance(n_hat, r_hat, spectrum(kernels.s_science),
                                       spectrum(kernels.s_template), sigma_ast_n, sigma_ast_r,
                                       fshape, out_shape, workers)
    return diff, score, var_d, var_s


def _cell_psf_kernels(science: Exposure, template: Exposure, cells_y: np.ndarray,
                      cells_x: np.ndarray, recenter: bool
                      ) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """(P_n, P_r, largest re-centring) at the centre of each cell, row by row."""
    assert science.psf is not None and template.psf is not None
    out = []
    for j in range(len(cells_y) - 1):
        for i in range(len(cells_x) - 1):
            x = (cells_x[i] + cells_x[i + 1] - 1) / 2.0
            y = (cells_y[j] + cells_y[j + 1] - 1) / 2.0
            pn, _, sn = _psf_kernel(science.psf, x, y, recenter, "science")
            pr, _, sr = _psf_kernel(template.psf, x, y, recenter, "template")
            out.append((pn, pr, max(math.hypot(*sn), math.hypot(*sr))))
    sizes = {(pn.shape, pr.shape) for pn, pr, _ in out}
    if len(sizes) > 1:
        raise InputError(f"psf: kernel sizes change over the image ({sorted(sizes)}); tiled "
                         "ZOGY needs one size")
    return out


def _cell_bounds(n: int, tile_size: int | None) -> np.ndarray:
    """Boundaries of the tiles along one axis: about ``tile_size`` pixels each."""
    count = 1 if tile_size is None else max(1, round(n / tile_size))
    return np.round(np.linspace(0, n, count + 1)).astype(int)


def _partition(n: int, bounds: np.ndarray, blend: int) -> list[np.ndarray]:
    """1-d weights of the cells between ``bounds``, summing to 1 at every pixel.

    Each inner boundary is crossed by a raised-cosine ramp ``2 blend`` pixels wide, so
    neighbouring tiles' results (from slightly different PSFs) fade into each other without
    a seam.
    """
    centres = np.arange(n) + 0.5  # pixel i covers [i, i + 1); boundary b lies before pixel b

    def step(b: int) -> np.ndarray:
        t = np.clip((centres - (b - blend)) / (2 * blend), 0.0, 1.0)
        return 0.5 - 0.5 * np.cos(np.pi * t)

    weights = []
    for i in range(len(bounds) - 1):
        w = np.ones(n)
        if i > 0:
            w *= step(bounds[i])
        if i < len(bounds) - 2:
            w *= 1.0 - step(bounds[i + 1])
        weights.append(w.astype(np.float32))
    return weights


def _filter_tiles(img_n: np.ndarray, img_r: np.ndarray, wvar_n: np.ndarray,
                  wvar_r: np.ndarray, cell_psfs: list[tuple[np.ndarray, np.ndarray, float]],
                  cells_y: np.ndarray, cells_x: np.ndarray, kernel_args: tuple, psf_size: int,
                  pad: int, config: ZogyConfig
                  ) -> tuple[list[_Tile], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Tiled ZOGY: each tile with the PSFs at its centre, results blended across overlaps.

    A tile's region extends past its cell by the blending half-width plus the kernel radius,
    so every pixel kept is computed from complete data (the kernels are exactly that wide);
    only real image edges see the zero padding. Variances are blended with the same weights
    (neighbouring tiles' kernels are nearly identical, so their noise is nearly the same).
    """
    height, width = img_n.shape
    radius = kernel_args[4]
    blend = _TILE_BLEND
    wy = _partition(height, cells_y, blend)
    wx = _partition(width, cells_x, blend)
    outputs = tuple(np.zeros((height, width), np.float32) for _ in range(4))
    tiles = []
    for j in range(len(cells_y) - 1):
        y0 = max(0, cells_y[j] - blend - radius)
        y1 = min(height, cells_y[j + 1] + blend + radius)
        for i in range(len(cells_x) - 1):
            x0 = max(0, cells_x[i] - blend - radius)
            x1 = min(width, cells_x[i + 1] + blend + radius)
            pn, pr, shift = cell_psfs[j * (len(cells_x) - 1) + i]
            kernels = _zogy_kernels(pn, pr, *kernel_args, psf_size)
            tiles.append(_Tile(kernels, shift))
            region = (slice(y0, y1), slice(x0, x1))
            fshape = (_fast_even(y1 - y0 + pad), _fast_even(x1 - x0 + pad))
            bufs = []
            for values in (img_n, img_r, wvar_n, wvar_r):
                buf = np.zeros(fshape, np.float32)
                buf[:y1 - y0, :x1 - x0] = values[region]
                bufs.append(buf)
            parts = _filter_region(*bufs, kernels, (y1 - y0, x1 - x0),
                                   config.astrometric_sigma, config.workers)
            weight = wy[j][y0:y1, None] * wx[i][None, x0:x1]
            for total, part in zip(outputs, parts, strict=True):
                total[region] += weight * part
    return tiles, outputs


def zogy_subtract(science: Exposure, template: Exposure, config: ZogyConfig | None = None,
                  mask_sources: np.ndarray | None = None) -> ZogyResult:
    """Subtract an aligned template from a science exposure with ZOGY.

    Parameters
    ----------
    science, template
        Background-subtracted exposures on the same pixel grid, each with a PSF model and a
        variance plane. Pixels with any of ``config.zero_mask_planes`` set in either, or with
        non-finite values, are not used (set to 0, tapered, masked in the output).
    config
        Settings (:class:`ZogyConfig`); defaults when omitted.
    mask_sources
        Optional boolean image, True on source pixels, to exclude from the noise statistics
        (background sigma, noise ratio). By default sources are found by thresholding both
        images smoothed with their PSF's FWHM at ``config.source_threshold``, grown by 1 FWHM,
        plus the inputs' DETECTED planes.

    Returns
    -------
    ZogyResult
        ``quality`` holds ``noise_ratio`` (robust std of D/sqrt(var) on source-free,
        unmasked, untapered pixels, before any rescaling), ``variance_scale`` (applied to the
        variance, and its square root to the score; 1 when not rescaled, or when the ratio is
        outside 0.5-2, which points at wrong inputs), ``flux_ratio``, ``flux_ratio_err``,
        ``flux_ratio_calib`` (from photo_calib, NaN without), ``n_flux_ratio_stars``,
        ``sigma_science``, ``sigma_template`` (background noise from the variance planes, own
        counts), ``input_noise_ratio_science`` / ``_template`` (pixel noise over variance-plane
        noise), ``fwhm_science``, ``fwhm_template``, ``fwhm_difference``, ``psf_shift_science``
        / ``_template`` (re-centring applied at the image centre, pixels), ``psf_shift_max``
        (over tiles), ``flux_zero_point`` (F_D), ``kernel_radius``, ``kernel_truncation``
        (power outside it), ``n_tiles``, ``pad``, ``taper``, ``masked_fraction``,
        ``edge_fraction``, ``n_noise_pixels``.

    Raises
    ------
    InputError
        Misaligned shapes, missing PSFs, unusable variance planes, bad ``mask_sources``.
    StageError
        Nothing usable left, or no flux ratio available (too few bright stars to fit and no
        photometric calibrations).
    """
    config = config or ZogyConfig()
    _check_inputs(science, template)
    assert science.psf is not None and template.psf is not None  # for type checkers
    shape = science.shape
    height, width = shape
    workers = config.workers

    bad = _bad_pixels(science, config.zero_mask_planes)
    bad |= _bad_pixels(template, config.zero_mask_planes)
    if bad.all():
        raise StageError("zogy: no pixel is usable in both science and template")

    xc, yc = (width - 1) / 2.0, (height - 1) / 2.0
    psf_n, fwhm_n, shift_n = _psf_kernel(science.psf, xc, yc, config.recenter_psf, "science")
    psf_r, fwhm_r, shift_r = _psf_kernel(template.psf, xc, yc, config.recenter_psf, "template")
    fwhm_max = max(fwhm_n, fwhm_r)
    psf_size = max(psf_n.shape[0], psf_r.shape[0])
    # Tiles (or the whole image as one) and the PSF kernels at their centres.
    cells_y = _cell_bounds(height, config.tile_size)
    cells_x = _cell_bounds(width, config.tile_size)
    tiled = len(cells_y) > 2 or len(cells_x) > 2
    cell_psfs = (_cell_psf_kernels(science, template, cells_y, cells_x, config.recenter_psf)
                 if tiled else
                 [(psf_n, psf_r, max(math.hypot(*shift_n), math.hypot(*shift_r)))])
    # Kernel size (and so the padding) from a first look at the kernels, with the noise from
    # the variance planes' medians and the flux ratio as known so far: their extent depends
    # on the PSFs' shapes, hardly on these.
    radius = config.kernel_radius
    if radius is None:
        cap = max(psf_size // 2, min(_MAX_KERNEL_RADIUS, min(shape) // 4))
        good = ~bad
        sl0 = _sample(good)
        rough_sigma = []
        for name, exp in (("science", science), ("template", template)):
            value = math.sqrt(max(0.0, float(np.median(exp.variance[sl0][good[sl0]]))))
            if not value > 0:
                raise InputError(f"{name}: variance plane is not positive on usable pixels "
                                 "(expected the per-pixel variance of the image)")
            rough_sigma.append(value)
        first_look = (
            psf_n, psf_r, *rough_sigma,
            config.flux_ratio or _initial_flux_ratio(science, template) or 1.0,
            config.epsilon, None, config.kernel_tolerance)
        # Grow the search grid only as far as needed (compact kernels are the usual case).
        search = min(cap, max(psf_size, 32))
        while True:
            radius = _zogy_kernels(*first_look, search, psf_size).radius
            if radius < search or search >= cap:
                break
            search = min(cap, 2 * search)
    pad = radius if config.pad is None else config.pad
    taper = math.ceil(2 * fwhm_max) if config.taper is None else config.taper
    pshape = _padded_shape(shape, pad)
    if 2 * radius + 1 > min(pshape):
        radius = (min(pshape) - 1) // 2

    weights = _taper_weights(shape, bad, taper)
    # The inputs go straight into zero-padded FFT buffers; img_* and var_* are views of them.
    img_n, buf_n = _padded_product(science.image, weights, bad, pshape)
    img_r, buf_r = _padded_product(template.image, weights, bad, pshape)
    var_n = np.where(bad, np.float32(0), science.variance)
    var_r = np.where(bad, np.float32(0), template.variance)
    n_hat = sfft.rfft2(buf_n, workers=workers)
    r_hat = sfft.rfft2(buf_r, workers=workers)

    # Pixels for statistics: unmasked, untapered and (below) source-free.
    untapered = (weights >= _UNTAPERED) & ~bad
    if untapered.sum() < _MIN_STAT_PIXELS:
        raise StageError(f"zogy: only {int(untapered.sum())} unmasked pixels away from the "
                         f"edges and masks (taper {taper} px); need {_MIN_STAT_PIXELS}")
    snr_n = _smoothed_half(n_hat, pshape, shape, fwhm_n, untapered, workers)
    snr_r = (_smoothed_half(r_hat, pshape, shape, fwhm_r, untapered, workers)
             if mask_sources is None else None)
    sources = _source_pixels(mask_sources, science, template, snr_n,
                             snr_r if snr_r is not None else snr_n,
                             config.source_threshold, math.ceil(fwhm_max))
    stat = untapered & ~sources
    n_stat = int(stat.sum())
    if n_stat < _MIN_STAT_PIXELS:
        raise StageError(f"zogy: only {n_stat} source-free unmasked pixels for the noise "
                         f"statistics; need {_MIN_STAT_PIXELS} (crowded field?)")
    sl = _sample(stat)
    stat_s = stat[sl]
    sigma_n = math.sqrt(float(np.median(var_n[sl][stat_s])))
    sigma_r = math.sqrt(float(np.median(var_r[sl][stat_s])))
    for name, value in (("science", sigma_n), ("template", sigma_r)):
        if not value > 0:
            raise InputError(f"{name}: variance plane is not positive on source-free pixels "
                             "(expected the per-pixel variance of the image)")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio_n = _robust_std((img_n[sl] / np.sqrt(var_n[sl]))[stat_s])
        ratio_r = _robust_std((img_r[sl] / np.sqrt(var_r[sl]))[stat_s])

    # Flux ratio F_r / F_n: given, fitted on bright stars, or from the calibrations.
    calib_ratio = _initial_flux_ratio(science, template)
    ratio_err, n_ratio_stars = float("nan"), 0
    if config.flux_ratio is not None:
        flux_ratio = float(config.flux_ratio)
    else:
        flux_ratio = float("nan")
        if config.fit_flux_ratio:
            # Each star is compared through the PSFs valid where it is: those of its tile, or
            # of a 3 x 3 grid when not tiling (PSFs vary, and the centre's would bias the
            # ratio by ~0.5% for a 10% change of FWHM across the image).
            ratio_y, ratio_x, ratio_psfs = cells_y, cells_x, cell_psfs
            if not tiled:
                ratio_y = _cell_bounds(height, max(1, height // 3))
                ratio_x = _cell_bounds(width, max(1, width // 3))
                ratio_psfs = _cell_psf_kernels(science, template, ratio_y, ratio_x,
                                               config.recenter_psf)
            cross = [_cross_kernels(pn, pr) for pn, pr, _ in ratio_psfs]
            x, y = _find_stars(snr_n, untapered, config.flux_ratio_min_snr, fwhm_max,
                               max(k.shape[0] for k, _ in cross) // 2,
                               config.flux_ratio_max_stars)
            group = (np.clip(np.searchsorted(ratio_y, y, side="right") - 1, 0,
                             len(ratio_y) - 2) * (len(ratio_x) - 1)
                     + np.clip(np.searchsorted(ratio_x, x, side="right") - 1, 0,
                               len(ratio_x) - 2))
            fitted, err, n_used = _fit_flux_ratio(img_n, img_r, var_n, var_r, cross, group,
                                                  x, y, config.flux_ratio_clip)
            if n_used >= config.flux_ratio_min_stars and fitted > 0:
                flux_ratio, ratio_err, n_ratio_stars = fitted, err, n_used
            else:
                log.warning("zogy: %d usable stars with S/N > %g for the flux-ratio fit "
                            "(need %d)", n_used, config.flux_ratio_min_snr,
                            config.flux_ratio_min_stars)
        if not np.isfinite(flux_ratio):
            if calib_ratio is None:
                raise StageError(
                    "zogy: no flux ratio: fewer than "
                    f"{config.flux_ratio_min_stars} bright unmasked stars (S/N > "
                    f"{config.flux_ratio_min_snr:g}) to fit it, and no photo_calib on both "
                    "exposures; set ZogyConfig.flux_ratio or give calibrated exposures")
            flux_ratio = calib_ratio

    # Difference, score and their variances: one region with the PSFs at the image centre, or
    # overlapping tiles each with its own PSFs, blended.
    w2 = weights * weights
    kernel_args = (sigma_n, sigma_r, flux_ratio, config.epsilon, radius,
                   config.kernel_tolerance, radius)
    if not tiled:
        tiles = [_Tile(kernels=_zogy_kernels(psf_n, psf_r, *kernel_args, psf_size),
                       shift=cell_psfs[0][2])]
        buf_vn = _padded_product(var_n, w2, bad, pshape)[1]
        buf_vr = _padded_product(var_r, w2, bad, pshape)[1]
        del w2
        diff, score, var_d, var_s = _filter_region(
            buf_n, buf_r, buf_vn, buf_vr, tiles[0].kernels, shape, config.astrometric_sigma,
            workers, n_hat, r_hat)
        del buf_n, buf_r, buf_vn, buf_vr, n_hat, r_hat
    else:
        del n_hat, r_hat, buf_n, buf_r
        tiles, (diff, score, var_d, var_s) = _filter_tiles(
            img_n, img_r, var_n * w2, var_r * w2, cell_psfs, cells_y, cells_x, kernel_args,
            psf_size, pad, config)
        del w2
    centre_tile = tiles[len(tiles) // 2]
    truncation = max(t.kernels.truncation for t in tiles)
    # ~1e-3 of the power left out puts a ring of ~1e-3 of the peak around bright stars.
    if truncation > 100 * config.kernel_tolerance:
        log.warning("zogy: kernels lose %.1e of their power outside %d px (PSF stamps cut "
                    "too tightly?); raise kernel_radius", truncation, radius)

    # Pixels outside the data have (numerically) no variance: guard before dividing.
    np.maximum(var_d, np.float32(1e-12) * np.median(var_d[sl][stat_s]), out=var_d)
    np.maximum(var_s, np.float32(1e-12) * np.median(var_s[sl][stat_s]), out=var_s)
    score /= np.sqrt(var_s, out=var_s)
    del var_s

    chi = diff[sl][stat_s] / np.sqrt(var_d[sl][stat_s])
    noise_ratio = _robust_std(chi)
    variance_scale = 1.0
    if config.rescale_variance and np.isfinite(noise_ratio):
        if _RESCALE_RANGE[0] <= noise_ratio <= _RESCALE_RANGE[1]:
            variance_scale = noise_ratio**2
            var_d *= np.float32(variance_scale)
            score /= np.float32(noise_ratio)
        else:
            # Far off means wrong inputs (variance in other units, noiseless images): say so
            # rather than paper over it.
            log.warning("zogy: difference noise is %.3g times the propagated variance; not "
                        "rescaling (check the inputs' variance planes)", noise_ratio)

    mask = _output_mask(science.mask, template.mask, config)
    nonfinite = ~(np.isfinite(science.image) & np.isfinite(template.image))
    if nonfinite.any():
        mask.add_plane("NO_DATA")
        mask.set("NO_DATA", nonfinite)
    edge = (weights < _TAPER_MASK_LEVEL) & ~bad
    if edge.any():
        mask.add_plane("EDGE")
        mask.set("EDGE", edge)
    # The project's convention for pixels without data: value 0, infinite variance.
    np.copyto(diff, np.float32(0), where=bad)
    np.copyto(var_d, np.float32(np.inf), where=bad)
    np.copyto(score, np.float32(0), where=bad)

    # P_D at the centre of every tile (bilinear in between), or at the image centre.
    psf_images = np.stack([t.kernels.psf_d for t in tiles]).astype(np.float32)
    psf_images = psf_images.reshape(len(cells_y) - 1, len(cells_x) - 1, *psf_images.shape[1:])
    nodes_y = (cells_y[:-1] + cells_y[1:] - 1) / 2.0
    nodes_x = (cells_x[:-1] + cells_x[1:] - 1) / 2.0
    difference = Exposure(
        image=diff, variance=var_d, mask=mask,
        psf=GridPsf(nodes_x, nodes_y, psf_images),
        wcs=science.wcs, photo_calib=science.photo_calib, visit_info=science.visit_info,
        detector_info=science.detector_info, metadata=science.metadata.copy(),
    )
    difference.metadata["DIFFALG"] = ("ZOGY", "image differencing algorithm")
    difference.metadata["FLXRATIO"] = (flux_ratio, "template counts per science count")
    quality = {
        "noise_ratio": noise_ratio,
        "variance_scale": variance_scale,
        "flux_ratio": flux_ratio,
        "flux_ratio_err": ratio_err,
        "flux_ratio_calib": calib_ratio if calib_ratio is not None else float("nan"),
        "n_flux_ratio_stars": float(n_ratio_stars),
        "sigma_science": sigma_n,
        "sigma_template": sigma_r,
        "input_noise_ratio_science": ratio_n,
        "input_noise_ratio_template": ratio_r,
        "fwhm_science": fwhm_n,
        "fwhm_template": fwhm_r,
        "fwhm_difference": measure_fwhm(centre_tile.kernels.psf_d),
        "psf_shift_science": math.hypot(*shift_n),
        "psf_shift_template": math.hypot(*shift_r),
        "psf_shift_max": max(t.shift for t in tiles),
        "flux_zero_point": centre_tile.kernels.flux_zero_point,
        "kernel_truncation": truncation,
        "kernel_radius": float(radius),
        "n_tiles": float(len(tiles)),
        "pad": float(pad),
        "taper": float(taper),
        "masked_fraction": float(bad.mean()),
        "edge_fraction": float(edge.mean()),
        "n_noise_pixels": float(n_stat),
    }
    return ZogyResult(difference=difference, score=score.astype(np.float32, copy=False),
                      score_psf=centre_tile.kernels.score_psf.astype(np.float32),
                      flux_ratio=flux_ratio,
                      quality=quality)


def _astrometric_variance(n_hat: np.ndarray, r_hat: np.ndarray, ks_n_hat: np.ndarray,
                          ks_r_hat: np.ndarray, sigma_n: float, sigma_r: float,
                          pshape: tuple[int, int], shape: tuple[int, int], workers: int
                          ) -> np.ndarray:
    """The paper's astrometric-noise variance of S (eqs. 30-33).

    A registration error of rms sigma shifts each image's part of the score, S_N = k_sn (x) N
    and S_R = k_sr (x) R, so S gains variance ``sigma^2 (dS/dx)^2 + sigma^2 (dS/dy)^2`` per
    image; bright stars then stop looking like transients. Derivatives are taken in Fourier
    space (multiplication by 2 pi i k), exact for band-limited images.
    """
    fy = (2j * np.pi * sfft.fftfreq(pshape[0])).astype(np.complex64)[:, None]
    fx = (2j * np.pi * sfft.rfftfreq(pshape[1])).astype(np.complex64)[None, :]
    total = np.zeros(shape, np.float32)
    for sigma, part in ((sigma_n, ks_n_hat * n_hat), (sigma_r, ks_r_hat * r_hat)):
        if sigma <= 0:
            continue
        for freq in (fx, fy):
            grad = sfft.irfft2(part * freq, s=pshape, workers=workers)[:shape[0], :shape[1]]
            total += np.float32(sigma**2) * grad * grad
    return total
