"""Template warping onto a science grid: flux, positions, surface brightness, variance, masks,
coverage, the warped PSF, alignment and the error cases.

Stars are drawn at known sky positions into template grids that are shifted by a few pixels,
rotated by 0.5 degree (TAN-SIP from the simulated DECam camera) and, in one case, have 5% larger
pixels; every expectation comes from the WCSs and the drawn truth, not from the code under test.
"""

from __future__ import annotations

import dataclasses
import itertools

import galsim
import numpy as np
import pytest
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_area
from pydantic import ValidationError

from apqa.config import config_from_mapping
from apqa.datamodel import Exposure, GridPsf, MoffatPsf
from apqa.datamodel.psf import render_moffat_stamps
from apqa.errors import ConfigError, InputError, StageError
from apqa.pipeline.diffim.warp import WarpConfig, WarpResult, is_aligned, warp_exposure
from apqa.sim.camera import detector_wcs
from apqa.sim.datasets import DECAM

SHAPE = (512, 256)  # science grid (height, width)
FWHM = 3.5  # template PSF, template pixels
BETA, TRUNC = 3.5, 4.0
STAR_FLUX = 1.0e5
SHIFT = (3.3, -2.7)  # template pixel of the science centre minus the science centre


# --------------------------------------------------------------------------------------------
# Helpers: WCSs, star scenes, measurements
# --------------------------------------------------------------------------------------------


def _tan_wcs(shape: tuple[int, int] = SHAPE, scale_arcsec: float = 0.263,
             rot_deg: float = 0.0, crpix_shift: tuple[float, float] = (0.0, 0.0)) -> WCS:
    theta = np.deg2rad(rot_deg)
    scale = scale_arcsec / 3600.0
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [(shape[1] + 1) / 2 + crpix_shift[0], (shape[0] + 1) / 2 + crpix_shift[1]]
    w.wcs.cd = [[-scale * np.cos(theta), scale * np.sin(theta)],
                [scale * np.sin(theta), scale * np.cos(theta)]]
    return w


def _science_wcs() -> WCS:
    return detector_wcs(DECAM, 1, 145.0, -3.0, 0.0)


def _template_wcs(science: WCS, rot_deg: float = 0.5, pixel_scale_factor: float = 1.0,
                  shift: tuple[float, float] = SHIFT) -> WCS:
    """A TAN-SIP detector WCS rotated by ``rot_deg`` whose boresight is moved so that the science
    grid's centre lands ``shift`` template pixels from the same pixel coordinates."""
    camera = dataclasses.replace(DECAM, pixel_scale=DECAM.pixel_scale * pixel_scale_factor)
    centre = np.array([(SHAPE[1] - 1) / 2, (SHAPE[0] - 1) / 2])
    ra_c, dec_c = science.all_pix2world(centre[0], centre[1], 0)
    target = centre + np.asarray(shift)
    ra0, dec0 = 145.0, -3.0
    for _ in range(6):
        wcs = detector_wcs(camera, 1, ra0, dec0, rot_deg)
        x, y = wcs.all_world2pix(ra_c, dec_c, 0)
        # Moving the boresight by the sky vector of the pixel offset moves the grid with it.
        d_sky = wcs.pixel_scale_matrix @ (np.array([x, y]) - target)
        ra0 += float(d_sky[0]) / np.cos(np.deg2rad(dec0))
        dec0 += float(d_sky[1])
    return detector_wcs(camera, 1, ra0, dec0, rot_deg)


def _star_sky(science: WCS, margin: float = 30.0, step: float = 44.0) -> tuple[np.ndarray, ...]:
    """Sky positions of an isolated grid of stars over the science grid (random sub-pixel
    phases)."""
    rng = np.random.default_rng(7)
    xs = np.arange(margin, SHAPE[1] - margin, step)
    ys = np.arange(margin, SHAPE[0] - margin, step)
    xx, yy = np.meshgrid(xs, ys)
    x = xx.ravel() + rng.uniform(-0.5, 0.5, xx.size)
    y = yy.ravel() + rng.uniform(-0.5, 0.5, xx.size)
    ra, dec = science.all_pix2world(x, y, 0)
    return ra, dec


def _draw_stars(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: float,
                fwhm: float, g1: float = 0.0) -> np.ndarray:
    image = np.zeros(shape, np.float64)
    size = 2 * int(np.ceil(TRUNC * fwhm * 1.1)) + 1
    half = size // 2
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    n = x.size
    stamps = render_moffat_stamps(x - ix, y - iy, np.full(n, fwhm), np.full(n, g1),
                                  np.zeros(n), BETA, TRUNC, size, order=3)
    for stamp, cx, cy in zip(stamps, ix, iy, strict=True):
        y0, x0 = cy - half, cx - half
        ys = slice(max(0, y0), min(shape[0], y0 + size))
        xs = slice(max(0, x0), min(shape[1], x0 + size))
        image[ys, xs] += flux * stamp[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
    return image


def _template(wcs: WCS, ra: np.ndarray, dec: np.ndarray, g1: float = 0.0,
              shape: tuple[int, int] = SHAPE) -> Exposure:
    x, y = wcs.all_world2pix(ra, dec, 0)
    image = _draw_stars(shape, x, y, STAR_FLUX, FWHM, g1)
    psf = MoffatPsf(width=shape[1], height=shape[0], fwhm_coeffs=[FWHM], g1_coeffs=[g1],
                    beta=BETA, trunc=TRUNC, order=3)
    return Exposure(image, np.ones(shape), wcs=wcs, psf=psf)


def _aperture_flux(image: np.ndarray, x: float, y: float, radius: float) -> float:
    yy, xx = np.mgrid[0:image.shape[0], 0:image.shape[1]]
    return float(image[(xx - x) ** 2 + (yy - y) ** 2 <= radius**2].sum())


def _windowed_centroid(image: np.ndarray, x: float, y: float, sigma: float,
                       half: int = 12) -> tuple[float, float]:
    """SExtractor-style XWIN/YWIN: iterate a Gaussian-weighted first moment to convergence."""
    cx, cy = int(np.rint(x)), int(np.rint(y))
    yy, xx = np.mgrid[cy - half:cy + half + 1, cx - half:cx + half + 1]
    stamp = image[cy - half:cy + half + 1, cx - half:cx + half + 1]
    for _ in range(100):
        w = stamp * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
        dx = 2 * float((w * (xx - x)).sum() / w.sum())
        dy = 2 * float((w * (yy - y)).sum() / w.sum())
        x, y = x + dx, y + dy
        if abs(dx) < 1e-7 and abs(dy) < 1e-7:
            break
    return x, y


@dataclasses.dataclass
class Scene:
    science_wcs: WCS
    template: Exposure
    ra: np.ndarray
    dec: np.ndarray
    result: WarpResult


def _scene(pixel_scale_factor: float, kernel: str = "lanczos3") -> Scene:
    science = _science_wcs()
    template_wcs = _template_wcs(science, 0.5, pixel_scale_factor)
    ra, dec = _star_sky(science)
    template = _template(template_wcs, ra, dec)
    result = warp_exposure(template, science, SHAPE, WarpConfig(kernel=kernel))
    return Scene(science, template, ra, dec, result)


@pytest.fixture(scope="module")
def rotated() -> Scene:
    """Equal pixel scales, template shifted by (3.3, -2.7) px and rotated by 0.5 degree."""
    return _scene(1.0)


@pytest.fixture(scope="module")
def rescaled() -> Scene:
    """As :func:`rotated` with 0.5% larger template pixels (twice the pixel-scale change the
    radial distortion of the simulated DECam makes across its field)."""
    return _scene(1.005)


def _star_checks(scene: Scene, flux_tol: float, pos_tol: float) -> None:
    x, y = scene.science_wcs.all_world2pix(scene.ra, scene.dec, 0)
    image = scene.result.exposure.image
    assert not scene.result.exposure.mask.is_set("NO_DATA")[
        np.rint(y).astype(int), np.rint(x).astype(int)].any()
    fluxes = np.array([_aperture_flux(image, a, b, 18.0) for a, b in zip(x, y, strict=True)])
    np.testing.assert_allclose(fluxes, STAR_FLUX, rtol=flux_tol)
    sigma = FWHM / 2.3548
    centroids = np.array([_windowed_centroid(image, a, b, sigma)
                          for a, b in zip(x, y, strict=True)])
    offsets = np.hypot(centroids[:, 0] - x, centroids[:, 1] - y)
    assert offsets.max() < pos_tol, offsets.max()


# --------------------------------------------------------------------------------------------
# Flux, positions, surface brightness
# --------------------------------------------------------------------------------------------


def test_stars_keep_flux_and_position(rotated):
    assert rotated.ra.size >= 40
    # Equal pixel scales conserve flux far better than the 0.2% budget (1e-5 measured).
    _star_checks(rotated, flux_tol=1e-4, pos_tol=0.01)


def test_stars_keep_flux_and_position_with_different_pixel_scale(rescaled):
    _star_checks(rescaled, flux_tol=2e-3, pos_tol=0.01)


def test_flux_ripple_with_very_different_pixel_scales():
    """With 5% larger template pixels, a normalized Lanczos-3 kernel distributes each template
    pixel's counts with a beat ripple of about +-0.5% per axis (its weights sum to 1 per output
    pixel, not per input pixel): single stars are within 1%, the mean over beat phases within
    0.05%."""
    scene = _scene(1.05)
    x, y = scene.science_wcs.all_world2pix(scene.ra, scene.dec, 0)
    fluxes = np.array([_aperture_flux(scene.result.exposure.image, a, b, 18.0)
                       for a, b in zip(x, y, strict=True)]) / STAR_FLUX
    assert np.abs(fluxes - 1).max() < 0.01
    assert abs(fluxes.mean() - 1) < 5e-4


def test_bilinear_keeps_flux_and_position():
    _star_checks(_scene(1.0, kernel="bilinear"), flux_tol=2e-3, pos_tol=0.02)


def test_centroid_method_is_unbiased_on_the_template(rotated):
    """The windowed centroid itself is exact to well below the warp tolerance."""
    x, y = rotated.template.wcs.all_world2pix(rotated.ra, rotated.dec, 0)
    c = np.array([_windowed_centroid(rotated.template.image, a, b, FWHM / 2.3548)
                  for a, b in zip(x, y, strict=True)])
    assert np.hypot(c[:, 0] - x, c[:, 1] - y).max() < 0.002


@pytest.mark.parametrize("factor", [1.0, 1.05])
def test_flat_surface_brightness(factor):
    """A constant template stays constant (equal scales) or scales with the pixel-area ratio."""
    science = _science_wcs()
    template_wcs = _template_wcs(science, 0.5, factor)
    level = 250.0
    template = Exposure(np.full(SHAPE, level), np.full(SHAPE, 4.0), wcs=template_wcs)
    warped = warp_exposure(template, science, SHAPE).exposure
    good = ~warped.mask.is_set("NO_DATA")
    assert good.mean() > 0.9
    ratio = proj_plane_pixel_area(science.celestial) / proj_plane_pixel_area(template_wcs.celestial)
    if factor == 1.0:
        assert abs(ratio - 1.0) < 1e-9
    else:
        assert abs(ratio - 1 / factor**2) < 1e-6
    np.testing.assert_allclose(warped.image[good], level * ratio, rtol=2e-5)
    # A constant variance is reduced by the kernel (sum of w^2 <= 1) and scaled by ratio^2.
    assert np.all(warped.variance[good] <= 4.0 * ratio**2 * (1 + 1e-5))
    assert np.all(warped.variance[good] > 0.3 * 4.0 * ratio**2)


def test_aligned_template_is_copied_unchanged():
    wcs = _science_wcs()
    rng = np.random.default_rng(3)
    template = Exposure(rng.normal(100, 5, SHAPE), rng.uniform(20, 30, SHAPE), wcs=wcs,
                        psf=MoffatPsf(SHAPE[1], SHAPE[0], [FWHM]))
    template.mask.set("BAD", (slice(None), 17))
    template.mask.set("SAT", (slice(100, 110), slice(30, 40)))
    result = warp_exposure(template, wcs, SHAPE)
    warped = result.exposure
    assert result.coverage == 1.0
    np.testing.assert_array_equal(warped.image, template.image)
    np.testing.assert_array_equal(warped.variance, template.variance)
    assert warped.mask == template.mask
    # The PSF kernels are reused as they are at every node.
    assert isinstance(warped.psf, GridPsf)
    for j, y in enumerate(warped.psf.nodes_y):
        for i, x in enumerate(warped.psf.nodes_x):
            np.testing.assert_array_equal(warped.psf.images[j, i], template.psf.image_at(x, y))


# --------------------------------------------------------------------------------------------
# Variance
# --------------------------------------------------------------------------------------------


def test_variance_plane_matches_measured_variance_of_warped_noise():
    """Per pixel, the propagated sum(w^2 var) is the variance of the warped noise: checked in
    bins of propagated variance, which follow the kernel phase (0.6..1 of the input times the
    squared pixel-area ratio)."""
    shape = (1024, 1024)
    science = _tan_wcs(shape)
    template_wcs = _tan_wcs(shape, scale_arcsec=0.263 * 1.03, rot_deg=0.7,
                            crpix_shift=(2.3, -1.6))
    rng = np.random.default_rng(11)
    # Spatially varying input variance (1 to 4) so that the plane is more than a constant.
    variance = np.tile(np.linspace(1.0, 4.0, shape[1]), (shape[0], 1))
    noise = rng.normal(0.0, np.sqrt(variance))
    template = Exposure(noise, variance, wcs=template_wcs)
    warped = warp_exposure(template, science, shape).exposure
    good = ~warped.mask.is_set("NO_DATA")
    chi2 = (warped.image[good].astype(float) ** 2) / warped.variance[good]
    propagated = warped.variance[good] / np.tile(np.linspace(1.0, 4.0, shape[1]),
                                                 (shape[0], 1))[good]
    assert propagated.max() / propagated.min() > 1.5  # the phases span the range
    edges = np.quantile(propagated, [0, 0.25, 0.5, 0.75, 1.0])
    for lo, hi in itertools.pairwise(edges):
        sel = (propagated >= lo) & (propagated <= hi)
        assert abs(chi2[sel].mean() - 1.0) < 0.02, (lo, hi, chi2[sel].mean())
    assert abs(chi2.mean() - 1.0) < 0.01


# --------------------------------------------------------------------------------------------
# Masks, NO_DATA, coverage
# --------------------------------------------------------------------------------------------


def test_bad_column_becomes_a_bad_band(rotated):
    template = rotated.template.copy()
    column = 100
    template.mask.set("BAD", (slice(None), column))
    warped = warp_exposure(template, rotated.science_wcs, SHAPE).exposure
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    u, v = template.wcs.all_world2pix(*rotated.science_wcs.all_pix2world(xx, yy, 0), 0)
    inside = (v > 5) & (v < SHAPE[0] - 6)
    bad = warped.mask.is_set("BAD")
    # Every pixel whose position is within half a pixel of the column is BAD; nothing beyond
    # the kernel's reach (3 px) is.
    assert bad[inside & (np.abs(u - column) <= 0.5)].all()
    assert not bad[np.abs(u - column) > 3.0].any()
    band_width = bad[inside].sum() / inside.any(axis=1).sum()
    assert 1.0 <= band_width <= 6.0
    # The band follows the rotated column across the science grid.
    assert np.ptp(xx[bad & inside]) > 3


def test_no_data_outside_coverage_and_coverage_fraction():
    shape = (300, 200)
    science = _tan_wcs(shape)
    template_wcs = _tan_wcs(shape, rot_deg=0.5, crpix_shift=(60.4, -30.2))
    template = Exposure(np.full(shape, 10.0), np.ones(shape), wcs=template_wcs)
    template.mask.set("NO_DATA", (slice(140, 160), slice(20, 50)))
    template.image[140:160, 20:50] = np.nan  # must not leak into neighbours
    template.variance[60, 100] = np.inf  # an unflagged non-finite pixel is NO_DATA too
    result = warp_exposure(template, science, shape)
    warped = result.exposure
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    u, v = template_wcs.all_world2pix(*science.all_pix2world(xx, yy, 0), 0)
    no_data = warped.mask.is_set("NO_DATA")
    # Lanczos-3 reads pixels floor(u)-2 .. floor(u)+3: inside the template for 2 <= u < W-3.
    footprint_in = (u >= 2) & (u < shape[1] - 3) & (v >= 2) & (v < shape[0] - 3)
    hole = ((u > 20 - 3) & (u < 49 + 3) & (v > 140 - 3) & (v < 159 + 3)
            | (np.abs(u - 100) < 3) & (np.abs(v - 60) < 3))
    expected = footprint_in & ~hole
    assert not no_data[expected].any()
    deep_outside = (u < -0.5) | (u > shape[1] - 0.5) | (v < -0.5) | (v > shape[0] - 0.5)
    assert no_data[deep_outside].all()
    assert no_data[(u > 20) & (u < 49) & (v > 140) & (v < 159)].all()
    assert no_data[(np.abs(u - 100) < 0.5) & (np.abs(v - 60) < 0.5)].all()
    assert result.coverage == pytest.approx(1 - no_data.mean())
    assert result.coverage == pytest.approx(expected.mean(), abs=0.01)
    assert np.all(warped.image[no_data] == 0.0)
    assert np.all(np.isinf(warped.variance[no_data]))
    assert np.isfinite(warped.image).all()
    np.testing.assert_allclose(warped.image[~no_data], 10.0, rtol=1e-5)


def test_low_coverage_is_a_stage_error():
    shape = (200, 200)
    science = _tan_wcs(shape)
    template_wcs = _tan_wcs(shape, crpix_shift=(170.0, 0.0))  # ~15% overlap
    template = Exposure(np.ones(shape), np.ones(shape), wcs=template_wcs)
    with pytest.raises(StageError, match=r"covers only 0\.1\d\d"):
        warp_exposure(template, science, shape)
    result = warp_exposure(template, science, shape, WarpConfig(min_coverage=0.1))
    assert 0.1 < result.coverage <= 0.16


def test_no_overlap_is_a_stage_error():
    shape = (200, 200)
    science = _tan_wcs(shape)
    far = _tan_wcs(shape, crpix_shift=(1000.0, 0.0))
    template = Exposure(np.ones(shape), np.ones(shape), wcs=far)
    with pytest.raises(StageError, match="no overlap"):
        warp_exposure(template, science, shape)
    opposite = _tan_wcs(shape)
    opposite.wcs.crval = [330.0, -2.0]  # the other side of the sky: not on the projection
    template = Exposure(np.ones(shape), np.ones(shape), wcs=opposite)
    with pytest.raises(StageError, match="no overlap"):
        warp_exposure(template, science, shape)


# --------------------------------------------------------------------------------------------
# Mapping accuracy
# --------------------------------------------------------------------------------------------


def test_coarse_grid_is_refined_for_strong_distortion():
    """Fifth-order SIP terms bend the mapping by ~0.3 px in a way a cubic spline on a 128 px
    grid misses by ~0.05 px: the grid must be refined until the interpolated mapping is within
    0.005 px, and stars land where the WCSs say."""
    shape = (256, 256)
    science = _tan_wcs(shape)
    header = _tan_wcs(shape, rot_deg=0.5, crpix_shift=(1.5, 0.5)).to_header()
    header["CTYPE1"], header["CTYPE2"] = "RA---TAN-SIP", "DEC--TAN-SIP"
    header["A_ORDER"], header["B_ORDER"] = 5, 5
    header["A_5_0"] = 0.2 / 128.0**5
    header["B_0_5"] = 0.12 / 128.0**5
    header["B_4_1"] = 0.2 / 128.0**5
    template_wcs = WCS(header)
    xs = np.arange(24.0, 232.0, 40.0)
    xx, yy = np.meshgrid(xs + 0.21, xs - 0.37)
    ra, dec = science.all_pix2world(xx.ravel(), yy.ravel(), 0)
    template = _template(template_wcs, ra, dec, shape=shape)
    coarse = warp_exposure(template, science, shape,
                           WarpConfig(grid_step=128, max_mapping_error=1.0))
    result = warp_exposure(template, science, shape, WarpConfig(grid_step=128))
    assert coarse.grid_step == 128 and coarse.mapping_error > 0.02
    assert result.grid_step <= 32
    assert result.mapping_error <= 0.005
    x, y = science.all_world2pix(ra, dec, 0)

    def worst_offset(warp: WarpResult) -> float:
        c = np.array([_windowed_centroid(warp.exposure.image, a, b, FWHM / 2.3548)
                      for a, b in zip(x, y, strict=True)])
        return float(np.hypot(c[:, 0] - x, c[:, 1] - y).max())

    assert worst_offset(result) < 0.01
    assert worst_offset(coarse) > 0.02  # what the refinement is for


# --------------------------------------------------------------------------------------------
# PSF
# --------------------------------------------------------------------------------------------


def _hsm(kernel: np.ndarray) -> galsim.hsm.ShapeData:
    return galsim.ImageD(np.ascontiguousarray(kernel, float)).FindAdaptiveMom()


def test_warped_psf_follows_rotation_and_scale():
    """An elongated template PSF rotated by 90 degrees and seen through 5% larger pixels:
    the warped PSF's moments match the warped stars'."""
    science = _science_wcs()
    template_wcs = _template_wcs(science, rot_deg=90.0, pixel_scale_factor=1.05,
                                 shift=(0.0, 0.0))
    # A 90-degree rotation swaps the axes: a square template around the centre covers it.
    shape = (600, 600)
    ra, dec = _star_sky(science, margin=60, step=70)
    off = (shape[1] - SHAPE[1]) / 2, (shape[0] - SHAPE[0]) / 2
    header = template_wcs.to_header(relax=True)
    header["CRPIX1"] += off[0]
    header["CRPIX2"] += off[1]
    template_wcs = WCS(header)
    template = _template(template_wcs, ra, dec, g1=0.15, shape=shape)
    result = warp_exposure(template, science, SHAPE, WarpConfig(min_coverage=0.0))
    psf = result.exposure.psf
    assert isinstance(psf, GridPsf) and psf.images.shape[:2] == (5, 3)
    t_shape = _hsm(template.psf.image_at(300.0, 300.0))
    x, y = science.all_world2pix(ra, dec, 0)
    centre = int(np.argmin(np.hypot(x - SHAPE[1] / 2, y - SHAPE[0] / 2)))
    model = _hsm(psf.image_at(x[centre], y[centre]))
    ix, iy = int(np.rint(x[centre])), int(np.rint(y[centre]))
    star = _hsm(result.exposure.image[iy - 20:iy + 21, ix - 20:ix + 21])
    # Rotated by 90 degrees: g1 changes sign; 5% larger template pixels: ~5% larger in science
    # pixels (less the few tenths of a percent the interpolation sharpens).
    assert t_shape.observed_shape.g1 > 0.1
    assert model.observed_shape.g1 == pytest.approx(-t_shape.observed_shape.g1, abs=3e-3)
    assert model.moments_sigma == pytest.approx(1.05 * t_shape.moments_sigma, rel=5e-3)
    # The model is what the warp does to the stars (which vary by ~0.15% with their phase).
    assert model.observed_shape.g1 == pytest.approx(star.observed_shape.g1, abs=3e-3)
    assert model.observed_shape.g2 == pytest.approx(star.observed_shape.g2, abs=3e-3)
    assert model.moments_sigma == pytest.approx(star.moments_sigma, rel=3e-3)
    for kernel in psf.images.reshape(-1, *psf.images.shape[2:]):
        assert kernel.sum() == pytest.approx(1.0, abs=1e-5)


def test_warped_psf_includes_the_interpolation_of_a_sub_pixel_shift():
    """A pure half-pixel shift: Lanczos-3 makes every star ~0.6% narrower (in moments); the
    warped PSF is not the template's but matches the stars to 1e-4."""
    science = _tan_wcs()
    template_wcs = _tan_wcs(crpix_shift=(0.5, 0.5))
    ra, dec = _star_sky(science)
    template = _template(template_wcs, ra, dec)
    result = warp_exposure(template, science, SHAPE)
    x, y = science.all_world2pix(ra, dec, 0)
    template_sigma = _hsm(template.psf.image_at(128.0, 256.0)).moments_sigma
    for a, b in list(zip(x, y, strict=True))[::7]:
        ix, iy = int(np.rint(a)), int(np.rint(b))
        star = _hsm(result.exposure.image[iy - 20:iy + 21, ix - 20:ix + 21])
        model = _hsm(result.exposure.psf.image_at(a, b))
        assert star.moments_sigma < (1 - 3e-3) * template_sigma
        assert model.moments_sigma == pytest.approx(star.moments_sigma, rel=1e-4)


def test_output_carries_template_calibration_and_science_wcs(rotated):
    warped = rotated.result.exposure
    assert warped.shape == SHAPE
    assert warped.photo_calib is rotated.template.photo_calib
    assert warped.visit_info is rotated.template.visit_info
    assert warped.wcs.to_header_string(relax=True) == rotated.science_wcs.to_header_string(
        relax=True)
    assert warped.image.dtype == np.float32 and warped.mask.array.dtype == np.int32
    assert 0.95 < rotated.result.coverage < 1.0


# --------------------------------------------------------------------------------------------
# is_aligned and errors
# --------------------------------------------------------------------------------------------


def test_is_aligned():
    wcs = _science_wcs()
    science = Exposure(np.zeros(SHAPE), np.ones(SHAPE), wcs=wcs)
    assert is_aligned(science, science)
    for shift, expected in ((0.005, True), (0.05, False)):
        header = wcs.to_header(relax=True)
        header["CRPIX1"] += shift
        template = Exposure(np.zeros(SHAPE), np.ones(SHAPE), wcs=WCS(header))
        assert is_aligned(template, science) is expected
    assert not is_aligned(Exposure(np.zeros((SHAPE[0], 100)), np.ones((SHAPE[0], 100)),
                                   wcs=wcs), science)
    rotated = Exposure(np.zeros(SHAPE), np.ones(SHAPE), wcs=_template_wcs(wcs, 0.5, 1.0))
    assert not is_aligned(rotated, science)
    with pytest.raises(InputError, match="template: no celestial WCS"):
        is_aligned(Exposure(np.zeros(SHAPE), np.ones(SHAPE)), science)


def test_template_without_celestial_wcs_is_an_input_error():
    template = Exposure(np.zeros(SHAPE), np.ones(SHAPE))
    with pytest.raises(InputError, match="template: no celestial WCS"):
        warp_exposure(template, _science_wcs(), SHAPE)
    linear = WCS(naxis=2)
    linear.wcs.ctype = ["LINEAR", "LINEAR"]
    template.wcs = linear  # set after construction, which would have refused it
    with pytest.raises(InputError, match="template: no celestial WCS"):
        warp_exposure(template, _science_wcs(), SHAPE)
    ok = Exposure(np.zeros(SHAPE), np.ones(SHAPE), wcs=_science_wcs())
    with pytest.raises(InputError, match="science wcs: no celestial WCS"):
        warp_exposure(ok, linear, SHAPE)
    with pytest.raises(InputError, match="shape"):
        warp_exposure(ok, _science_wcs(), (0, 10))


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValidationError):
        WarpConfig(kernal="bilinear")
    with pytest.raises(ValidationError):
        WarpConfig(kernel="lanczos5")
    with pytest.raises(ValidationError):
        WarpConfig(min_coverage=1.5)
    with pytest.raises(ValidationError):
        WarpConfig(psf_grid=(0, 5))
    with pytest.raises(ConfigError, match="unknown key 'grid'"):
        config_from_mapping(WarpConfig, {"grid": 16}, "warp.yaml")
    assert config_from_mapping(WarpConfig, {"psf_grid": [2, 3]}, "warp.yaml").psf_grid == (2, 3)


def test_psf_grid_nodes_follow_the_config(rotated):
    config = WarpConfig(psf_grid=(2, 4))
    psf = warp_exposure(rotated.template, rotated.science_wcs, SHAPE, config).exposure.psf
    assert psf.images.shape[:2] == (4, 2)
    np.testing.assert_allclose(psf.nodes_x, [0, SHAPE[1] - 1])
    np.testing.assert_allclose(psf.nodes_y, np.linspace(0, SHAPE[0] - 1, 4))


def test_mask_is_the_or_of_inputs_with_non_negligible_weight():
    """Brute force: for every output pixel, OR the mask of the 6x6 template pixels whose
    Lanczos-3 weight |wx wy| (normalized) exceeds 1e-3; blobs, scattered bits and NO_DATA."""
    shape = (64, 80)
    science = _tan_wcs(shape)
    template_wcs = _tan_wcs(shape, scale_arcsec=0.263 * 1.01, rot_deg=0.8,
                            crpix_shift=(2.37, -1.61))
    rng = np.random.default_rng(17)
    template = Exposure(rng.normal(size=shape), np.ones(shape), wcs=template_wcs)
    template.mask.set("CR", rng.uniform(size=shape) < 0.02)
    template.mask.set("DETECTED", (slice(20, 40), slice(30, 55)))
    template.mask.set("SAT", (slice(25, 30), slice(35, 45)))
    template.mask.set("NO_DATA", (slice(50, 53), slice(10, 14)))
    warped = warp_exposure(template, science, shape, WarpConfig(min_coverage=0.0)).exposure
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    u, v = template_wcs.all_world2pix(*science.all_pix2world(xx, yy, 0), 0)
    no_data = template.mask.bitmask("NO_DATA")
    taps = np.arange(-2, 4)
    expected = np.zeros(shape, np.int64)
    for (row, col), a, b in zip(np.ndindex(shape), u.ravel(), v.ravel(), strict=True):
        ix, iy = int(np.floor(a)), int(np.floor(b))
        wx = np.sinc(a - ix - taps) * np.sinc((a - ix - taps) / 3)
        wy = np.sinc(b - iy - taps) * np.sinc((b - iy - taps) / 3)
        weight = np.abs(np.outer(wy / wy.sum(), wx / wx.sum()))
        bits = 0
        for (j, i) in zip(*np.nonzero(weight > 1e-3), strict=True):
            ty, tx = iy + taps[j], ix + taps[i]
            inside = 0 <= ty < shape[0] and 0 <= tx < shape[1]
            bits |= int(template.mask.array[ty, tx]) if inside else no_data
        expected[row, col] = bits
    # Phases are looked up to 1/8192 px: a weight within ~1e-5 of the threshold may flip.
    assert np.count_nonzero(warped.mask.array != expected) <= 3
    assert warped.mask.is_set("SAT").sum() > 50
