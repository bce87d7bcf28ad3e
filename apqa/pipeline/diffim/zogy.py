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

import numpy as np

from apqa.datamodel import Exposure, GridPsf, measure_fwhm
from apqa.errors import InputError, StageError
from apqa.log import get_logger
from apqa.pipeline.diffim.zogy_flux import _initial_flux_ratio, choose_flux_ratio
from apqa.pipeline.diffim.zogy_kernels import (
    SIGMA_TO_FWHM,  # noqa: F401 (public constant of this module, re-exported)
    _cell_psf_kernels,
    _psf_kernel,
    _zogy_kernels,
)
from apqa.pipeline.diffim.zogy_noise import (
    _bad_pixels,
    _robust_std,
    _sample,
    _smoothed_half,
    _source_pixels,
    _taper_weights,
)
from apqa.pipeline.diffim.zogy_tiles import (
    _cell_bounds,
    _filter_region,
    _filter_tiles,
    _padded_product,
    _padded_shape,
    _padded_variance,
    _Tile,
)
from apqa.pipeline.diffim.zogy_types import ZogyConfig, ZogyResult, _output_mask
from apqa.pipeline.threads import beside, core_budget, on_both

log = get_logger(__name__)

#: Pixels whose taper weight is below this are masked EDGE in the difference image.
_TAPER_MASK_LEVEL = 0.99
#: Pixels with at least this taper weight count as untapered for statistics.
_UNTAPERED = 0.999
_MIN_STAT_PIXELS = 1000
#: Largest automatic half-width of the ZOGY kernels (pixels).
_MAX_KERNEL_RADIUS = 128
#: Pixels sampled for the first look's noise (it only sizes the kernels).
_ROUGH_STAT_PIXELS = 100_000
#: The difference variance is rescaled to the measured noise only within this range.
_RESCALE_RANGE = (0.5, 2.0)


def _check_inputs(science: Exposure, template: Exposure) -> None:
    if science.shape != template.shape:
        raise InputError(f"template: expected the science's shape {science.shape} (images must "
                         f"be aligned on the same pixel grid), got {template.shape}")
    for name, exp in (("science", science), ("template", template)):
        if exp.psf is None:
            raise InputError(f"{name}: exposure has no PSF model (ZOGY needs both PSFs)")
        if min(exp.shape) < 16:
            raise InputError(f"{name}: image of shape {exp.shape} is too small for ZOGY")


def _noise_stats(image: np.ndarray, variance: np.ndarray, stat: np.ndarray, name: str
                 ) -> tuple[float, float]:
    """Background noise (from the variance plane) and pixel noise over predicted noise, on
    the ``stat`` pixels of a sample of the image."""
    sigma = math.sqrt(float(np.median(variance[stat])))
    if not sigma > 0:
        raise InputError(f"{name}: variance plane is not positive on source-free pixels "
                         "(expected the per-pixel variance of the image)")
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero variance
        return sigma, _robust_std(image[stat] / np.sqrt(variance[stat]))


def zogy_subtract(science: Exposure, template: Exposure, config: ZogyConfig | None = None,
                  mask_sources: np.ndarray | None = None, with_score: bool = True
                  ) -> ZogyResult:
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
    with_score
        Compute the score image S_corr (a third of the transforms; ``score`` is None
        without it).

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
    budget = core_budget(workers)

    bad, bad_r = on_both(_bad_pixels, (science, config.zero_mask_planes),
                         (template, config.zero_mask_planes), budget)
    bad |= bad_r
    del bad_r
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
        sl0 = _sample(good, _ROUGH_STAT_PIXELS)
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
    # Without tiles the inputs go straight into zero-padded FFT buffers (img_* are views of
    # them); tiles copy their regions into buffers of their own.
    (img_n, buf_n), (img_r, buf_r) = on_both(
        _padded_product, (science.image, weights, bad, shape if tiled else pshape),
        (template.image, weights, bad, shape if tiled else pshape), budget)
    var_n, var_r = science.variance, template.variance  # usable where ~bad only

    # Pixels for statistics: unmasked, untapered and (below) source-free.
    untapered = (weights >= _UNTAPERED) & ~bad
    if untapered.sum() < _MIN_STAT_PIXELS:
        raise StageError(f"zogy: only {int(untapered.sum())} unmasked pixels away from the "
                         f"edges and masks (taper {taper} px); need {_MIN_STAT_PIXELS}")
    if mask_sources is None:
        half_workers = max(1, budget // 2)
        snr_n, snr_r = on_both(_smoothed_half, (img_n, fwhm_n, untapered, half_workers),
                               (img_r, fwhm_r, untapered, half_workers), budget)
    else:
        snr_n, snr_r = _smoothed_half(img_n, fwhm_n, untapered, workers), None
    # F_r / F_n (given, fitted on bright stars, or from the calibrations) beside the noise
    # statistics: neither needs the other.
    with beside(budget, choose_flux_ratio, science, template, img_n, img_r, bad, snr_n,
                untapered, cells_y, cells_x, cell_psfs, fwhm_max, config) as choosing:
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
        (sigma_n, ratio_n), (sigma_r, ratio_r) = on_both(
            _noise_stats, (img_n[sl], var_n[sl], stat_s, "science"),
            (img_r[sl], var_r[sl], stat_s, "template"), budget)
        ratio = choosing.result()
    flux_ratio = ratio.value

    # Difference, score and their variances: one region with the PSFs at the image centre, or
    # overlapping tiles each with its own PSFs, blended. The variances take the squared
    # weights region by region.
    kernel_args = (sigma_n, sigma_r, flux_ratio, config.epsilon, radius,
                   config.kernel_tolerance, radius)
    if not tiled:
        tiles = [_Tile(kernels=_zogy_kernels(psf_n, psf_r, *kernel_args, psf_size, with_score),
                       shift=cell_psfs[0][2])]
        buf_vn = _padded_variance(var_n, weights, bad, pshape)
        buf_vr = _padded_variance(var_r, weights, bad, pshape)
        diff, score, var_d, var_s = _filter_region(
            buf_n, buf_r, buf_vn, buf_vr, tiles[0].kernels, shape, config.astrometric_sigma,
            workers, with_score=with_score)
        del buf_n, buf_r, buf_vn, buf_vr
    else:
        del buf_n, buf_r
        tiles, (diff, score, var_d, var_s) = _filter_tiles(
            img_n, img_r, var_n, var_r, weights, bad, cell_psfs, cells_y, cells_x, kernel_args,
            psf_size, pad, config, with_score)
    centre_tile = tiles[len(tiles) // 2]
    truncation = max(t.kernels.truncation for t in tiles)
    # ~1e-3 of the power left out puts a ring of ~1e-3 of the peak around bright stars.
    if truncation > 100 * config.kernel_tolerance:
        log.warning("zogy: kernels lose %.1e of their power outside %d px (PSF stamps cut "
                    "too tightly?); raise kernel_radius", truncation, radius)

    # Pixels outside the data have (numerically) no variance: guard before dividing.
    np.maximum(var_d, np.float32(1e-12) * np.median(var_d[sl][stat_s]), out=var_d)
    if with_score:
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
            if with_score:
                score /= np.float32(noise_ratio)
        else:
            # Far off means wrong inputs (variance in other units, noiseless images): say so
            # rather than paper over it.
            log.warning("zogy: difference noise is %.3g times the propagated variance; not "
                        "rescaling (check the inputs' variance planes)", noise_ratio)

    mask = _output_mask(science.mask, template.mask, config)
    # Non-finite pixels are bad pixels: look for them there only (two image-sized passes).
    where_bad = np.flatnonzero(bad)
    nonfinite = np.zeros(shape, bool)
    nonfinite.flat[where_bad] = ~(np.isfinite(science.image.flat[where_bad])
                                  & np.isfinite(template.image.flat[where_bad]))
    if nonfinite.any():
        mask.add_plane("NO_DATA")
        mask.set("NO_DATA", nonfinite)
    edge = weights < _TAPER_MASK_LEVEL
    edge[bad] = False
    if edge.any():
        mask.add_plane("EDGE")
        mask.set("EDGE", edge)
    # The project's convention for pixels without data: value 0, infinite variance.
    np.copyto(diff, np.float32(0), where=bad)
    np.copyto(var_d, np.float32(np.inf), where=bad)
    if with_score:
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
        "flux_ratio_err": ratio.error,
        "flux_ratio_calib": ratio.calibrated,
        "n_flux_ratio_stars": float(ratio.n_stars),
        "flux_ratio_min_snr": float(ratio.min_snr),
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
    return ZogyResult(difference=difference,
                      score=score.astype(np.float32, copy=False) if with_score else None,
                      score_psf=centre_tile.kernels.score_psf.astype(np.float32),
                      flux_ratio=flux_ratio,
                      quality=quality)
