"""ZOGY subtraction on synthetic aligned pairs whose stars, transients and noise are known."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydantic
import pytest

from apqa.datamodel import Exposure, GridPsf, MoffatPsf, PhotoCalib, psf_stamps, shift_kernels
from apqa.errors import InputError, StageError
from apqa.pipeline.diffim.zogy import ZogyConfig, ZogyResult, zogy_subtract

SHAPE = (512, 512)
SIGMA_SCIENCE = 10.0
SIGMA_TEMPLATE = 6.0
# Block of NO_DATA pixels (rows, columns) used by the ringing test.
BLOCK = (slice(200, 260), slice(200, 280))


def _add_sources(image: np.ndarray, psf, x, y, flux) -> None:
    """Add point sources (flux in counts) rendered with ``psf`` at sub-pixel positions."""
    x, y, flux = (np.atleast_1d(np.asarray(v, float)) for v in (x, y, flux))
    stamps, ix, iy = psf_stamps(psf, x, y)
    half = stamps.shape[1] // 2
    height, width = image.shape
    for stamp, cx, cy, f in zip(stamps, ix, iy, flux, strict=True):
        y0, x0 = cy - half, cx - half
        ys = slice(max(y0, 0), min(y0 + stamp.shape[0], height))
        xs = slice(max(x0, 0), min(x0 + stamp.shape[1], width))
        image[ys, xs] += f * stamp[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]


@dataclass
class Pair:
    science: Exposure
    template: Exposure
    stars: np.ndarray       # (n, 3): x, y, science flux
    transient: tuple        # (x, y, science flux): only in the science
    faint: tuple            # a second, S/N ~ 100 transient, for the score
    vanished: tuple         # (x, y, science-equivalent flux): only in the template
    scale: float            # template counts per science count


def _psfs(fwhm_science: float, fwhm_template: float) -> tuple[MoffatPsf, MoffatPsf]:
    height, width = SHAPE
    return (MoffatPsf(width, height, fwhm_coeffs=[fwhm_science], g1_coeffs=[0.06],
                      g2_coeffs=[-0.03]),
            MoffatPsf(width, height, fwhm_coeffs=[fwhm_template], g1_coeffs=[-0.04],
                      g2_coeffs=[0.05]))


def _make_pair(seed: int, fwhm_science: float, fwhm_template: float, scale: float = 1.0,
               n_stars: int = 250, with_transients: bool = True, noise: bool = True,
               star_xy: np.ndarray | None = None, star_flux: float | None = None,
               template_offset: float = 0.0,
               psfs: tuple[MoffatPsf, MoffatPsf] | None = None) -> Pair:
    """Aligned science/template pair: constant stars, Gaussian noise of known sigma.

    ``template_offset`` (pixels, along x) misregisters the template's stars.
    """
    rng = np.random.default_rng(seed)
    height, width = SHAPE
    psf_s, psf_t = psfs or _psfs(fwhm_science, fwhm_template)
    transient = (150.2, 330.1, 26000.0)  # S/N ~ 300 on the difference
    faint = (380.0, 420.0, 8700.0)       # S/N ~ 100
    vanished = (400.3, 110.4, 13000.0)   # S/N ~ 150, negative on the difference
    if star_xy is None:
        xy = rng.uniform(4, [width - 4, height - 4], size=(4 * n_stars, 2))
        # Keep the transients and the NO_DATA block's surroundings free of stars.
        near = np.zeros(len(xy), bool)
        for tx, ty, _ in (transient, faint, vanished):
            near |= np.hypot(xy[:, 0] - tx, xy[:, 1] - ty) < 25
        near |= ((xy[:, 0] > BLOCK[1].start - 45) & (xy[:, 0] < BLOCK[1].stop + 45)
                 & (xy[:, 1] > BLOCK[0].start - 45) & (xy[:, 1] < BLOCK[0].stop + 45))
        star_xy = xy[~near][:n_stars]
    flux = 10 ** rng.uniform(np.log10(400), np.log10(40000), len(star_xy))
    if star_flux is not None:
        flux[:] = star_flux
    stars = np.column_stack([star_xy, flux])
    sci = np.zeros(SHAPE)
    tmp = np.zeros(SHAPE)
    _add_sources(sci, psf_s, stars[:, 0], stars[:, 1], stars[:, 2])
    _add_sources(tmp, psf_t, stars[:, 0] + template_offset, stars[:, 1], scale * stars[:, 2])
    if with_transients:
        for tx, ty, tf in (transient, faint):
            _add_sources(sci, psf_s, tx, ty, tf)
        _add_sources(tmp, psf_t, vanished[0], vanished[1], scale * vanished[2])
    if noise:
        sci += rng.normal(0.0, SIGMA_SCIENCE, SHAPE)
        tmp += rng.normal(0.0, scale * SIGMA_TEMPLATE, SHAPE)
    science = Exposure(sci, np.full(SHAPE, SIGMA_SCIENCE**2), psf=psf_s)
    template = Exposure(tmp, np.full(SHAPE, (scale * SIGMA_TEMPLATE) ** 2), psf=psf_t)
    return Pair(science, template, stars, transient, faint, vanished, scale)


def _psf_flux(result: ZogyResult, x: float, y: float) -> tuple[float, float]:
    """PSF-fit flux and error on the difference with its own PSF: sum(P D) / sum(P^2)."""
    diff = result.difference
    stamp, ix, iy = psf_stamps(diff.psf, np.array([x]), np.array([y]))
    p = stamp[0].astype(np.float64)
    half = p.shape[0] // 2
    window = (slice(iy[0] - half, iy[0] + half + 1), slice(ix[0] - half, ix[0] + half + 1))
    d = diff.image[window].astype(np.float64)
    v = diff.variance[window].astype(np.float64)
    pp = (p * p).sum()
    return float((p * d).sum() / pp), float(np.sqrt((p * p * v).sum()) / pp)


def _source_free(pair: Pair, result: ZogyResult) -> np.ndarray:
    """Pixels far from every true source and not masked."""
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    free = ~result.difference.mask.is_set(["EDGE", "NO_DATA", "BAD", "SAT"])
    sources = [*pair.stars.tolist(), pair.transient, pair.faint, pair.vanished]
    for x, y, f in sources:
        r = 16 if f > 5000 else 10
        ys = slice(max(0, int(y) - r), int(y) + r + 1)
        xs = slice(max(0, int(x) - r), int(x) + r + 1)
        free[ys, xs] &= np.hypot(xx[ys, xs] - x, yy[ys, xs] - y) > r
    return free


def _star_chi(pair: Pair, result: ZogyResult) -> np.ndarray:
    """Per constant star: rms of D / sqrt(var) within 2 FWHM of it."""
    diff = result.difference
    chi = diff.image / np.sqrt(diff.variance)
    usable = ~diff.mask.is_set(["EDGE", "NO_DATA"])
    radius = 2 * max(result.quality["fwhm_science"], result.quality["fwhm_template"])
    r = int(np.ceil(radius))
    out = []
    for x, y, _ in pair.stars:
        ix, iy = round(x), round(y)
        if not (r <= ix < SHAPE[1] - r and r <= iy < SHAPE[0] - r):
            continue
        yy, xx = np.mgrid[iy - r:iy + r + 1, ix - r:ix + r + 1]
        sel = (np.hypot(xx - x, yy - y) <= radius) & usable[yy, xx]
        if sel.sum() > 10:
            out.append(np.sqrt(np.mean(chi[yy, xx][sel] ** 2)))
    return np.array(out)


@pytest.fixture(scope="module", params=[(4.5, 3.5), (3.0, 4.2)],
                ids=["science-broader", "science-sharper"])
def subtracted(request) -> tuple[Pair, ZogyResult]:
    pair = _make_pair(7, *request.param)
    return pair, zogy_subtract(pair.science, pair.template)


def test_noise_ratio_in_source_free_pixels(subtracted):
    pair, result = subtracted
    diff = result.difference
    free = _source_free(pair, result)
    chi = diff.image[free] / np.sqrt(diff.variance[free])
    assert free.sum() > 50_000
    assert abs(np.std(chi) - 1.0) < 0.02
    assert abs(np.mean(chi)) < 0.02
    # The variance propagated from the inputs already matched: rescaling changed ~nothing.
    assert abs(result.quality["noise_ratio"] - 1.0) < 0.02
    assert abs(result.quality["variance_scale"] - 1.0) < 0.04
    # Background noise taken from the variance planes.
    assert result.quality["sigma_science"] == pytest.approx(SIGMA_SCIENCE, rel=1e-3)
    assert result.quality["sigma_template"] == pytest.approx(SIGMA_TEMPLATE, rel=1e-3)


def test_transient_flux_on_difference(subtracted):
    pair, result = subtracted
    x, y, flux = pair.transient
    fitted, err = _psf_flux(result, x, y)
    assert flux / err > 250  # a bright transient: the 1% test is not limited by noise
    assert abs(fitted / flux - 1) < 0.01
    assert abs(fitted - flux) < 3 * err


def test_vanished_source_is_negative_with_its_flux(subtracted):
    pair, result = subtracted
    x, y, flux = pair.vanished
    fitted, err = _psf_flux(result, x, y)
    assert fitted < 0
    assert abs(-fitted / flux - 1) < 0.02
    assert abs(-fitted - flux) < 3 * err
    iy, ix = round(y), round(x)
    assert result.score[iy - 2:iy + 3, ix - 2:ix + 3].min() < -100


def test_score_peak_is_the_transients_snr(subtracted):
    pair, result = subtracted
    x, y, flux = pair.faint
    _, err = _psf_flux(result, x, y)
    expected = flux / err
    assert 80 < expected < 130
    iy, ix = round(y), round(x)
    window = result.score[iy - 3:iy + 4, ix - 3:ix + 4]
    peak = np.unravel_index(np.argmax(window), window.shape)
    assert abs(peak[0] - 3) <= 1 and abs(peak[1] - 3) <= 1
    assert abs(window.max() / expected - 1) < 0.10
    # Far from sources the score is a unit Gaussian.
    free = _source_free(pair, result)
    assert abs(np.std(result.score[free]) - 1) < 0.05


def test_constant_stars_leave_noise_like_residuals(subtracted):
    pair, result = subtracted
    chi = _star_chi(pair, result)
    assert len(chi) > 150
    assert np.median(chi) <= 1.1
    assert np.percentile(chi, 95) < 1.5


def test_difference_psf_score_psf_and_metadata(subtracted):
    pair, result = subtracted
    diff = result.difference
    assert isinstance(diff.psf, GridPsf)
    kernel = diff.psf.image_at(100.0, 100.0)
    half = kernel.shape[0] // 2
    assert kernel.shape[0] % 2 == 1
    assert kernel.sum() == pytest.approx(1.0, abs=1e-5)
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    assert abs((kernel * xx).sum()) < 1e-3 and abs((kernel * yy).sum()) < 1e-3
    # P_D lies between the two PSFs in size.
    fwhm_d = result.quality["fwhm_difference"]
    lo, hi = sorted([result.quality["fwhm_science"], result.quality["fwhm_template"]])
    assert lo - 0.05 < fwhm_d < hi + 0.05
    score_psf = result.score_psf
    c = score_psf.shape[0] // 2
    assert score_psf[c, c] == pytest.approx(1.0) and score_psf.max() == pytest.approx(1.0)
    assert diff.shape == pair.science.shape
    assert diff.image.dtype == np.float32 and result.score.dtype == np.float32
    assert np.isfinite(diff.image).all() and np.isfinite(result.score).all()
    assert diff.metadata["DIFFALG"] == "ZOGY"


def test_flux_is_exact_without_noise():
    """D is linear in the inputs: (D with transients) - (D without) is their noiseless image."""
    config = ZogyConfig(flux_ratio=1.0)
    no_sources = np.zeros(SHAPE, bool)
    for fwhm in [(4.5, 3.5), (3.0, 4.2)]:
        with_t = _make_pair(3, *fwhm)
        without = _make_pair(3, *fwhm, with_transients=False)
        r1 = zogy_subtract(with_t.science, with_t.template, config, no_sources)
        r0 = zogy_subtract(without.science, without.template, config, no_sources)
        r1.difference.image -= r0.difference.image
        for x, y, flux in (with_t.transient, with_t.faint):
            assert _psf_flux(r1, x, y)[0] == pytest.approx(flux, rel=1e-3)
        x, y, flux = with_t.vanished
        assert _psf_flux(r1, x, y)[0] == pytest.approx(-flux, rel=1e-3)


def test_flux_ratio_recovered_for_scaled_template():
    pair = _make_pair(11, 4.5, 3.5, scale=1.3)
    result = zogy_subtract(pair.science, pair.template)
    assert result.flux_ratio == pytest.approx(1.3, rel=0.003)
    assert result.quality["n_flux_ratio_stars"] >= 20
    assert result.quality["flux_ratio_err"] < 0.003
    # The difference stays in science counts whatever the template's scale.
    x, y, flux = pair.transient
    assert _psf_flux(result, x, y)[0] == pytest.approx(flux, rel=0.01)
    assert np.median(_star_chi(pair, result)) <= 1.1


def test_flux_ratio_falls_back_to_fainter_stars():
    # A small field: twelve stars at S/N ~8, none above the default S/N 20, and no
    # calibration to fall back on. The fit lowers its threshold instead of giving up.
    grid = np.linspace(60, 450, 4)
    xy = np.array([(x, y) for x in grid for y in grid[:3]]) + 0.3
    pair = _make_pair(31, 4.5, 3.5, scale=1.3, star_xy=xy, star_flux=800.0,
                      with_transients=False)
    result = zogy_subtract(pair.science, pair.template)
    q = result.quality
    assert q["flux_ratio_min_snr"] < ZogyConfig().flux_ratio_min_snr
    assert q["n_flux_ratio_stars"] >= ZogyConfig().flux_ratio_min_stars
    assert 0 < q["flux_ratio_err"] < 0.1
    assert abs(result.flux_ratio - 1.3) < 3 * q["flux_ratio_err"]
    assert abs(q["noise_ratio"] - 1) < 0.03


def test_flux_ratio_direction_from_photo_calib():
    """nJy per count: science 2.0, template 2.0 / 1.3, so a source has 1.3x the counts there."""
    pair = _make_pair(11, 4.5, 3.5, scale=1.3)
    pair.science.photo_calib = PhotoCalib(2.0)
    pair.template.photo_calib = PhotoCalib(2.0 / 1.3)
    result = zogy_subtract(pair.science, pair.template, ZogyConfig(fit_flux_ratio=False))
    assert result.flux_ratio == pytest.approx(1.3, rel=1e-9)
    assert result.difference.photo_calib == pair.science.photo_calib
    assert np.median(_star_chi(pair, result)) <= 1.1
    # A wrong calibration is overridden by the fit on the stars.
    pair.template.photo_calib = PhotoCalib(2.0)
    fitted = zogy_subtract(pair.science, pair.template)
    assert fitted.quality["flux_ratio_calib"] == pytest.approx(1.0)
    assert fitted.flux_ratio == pytest.approx(1.3, rel=0.003)


def _with_no_data_block(pair: Pair) -> Pair:
    science, template = pair.science.copy(), pair.template.copy()
    science.image[BLOCK] = np.nan  # garbage under the mask must not matter
    science.variance[BLOCK] = np.inf  # (a variance weighted by 0 there would be NaN)
    science.mask.set("NO_DATA", BLOCK)
    template.image[BLOCK] += 1e5
    return Pair(science, template, pair.stars, pair.transient, pair.faint, pair.vanished,
                pair.scale)


def _distance_to_block() -> np.ndarray:
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    dy = np.maximum(np.maximum(BLOCK[0].start - yy, yy - (BLOCK[0].stop - 1)), 0)
    dx = np.maximum(np.maximum(BLOCK[1].start - xx, xx - (BLOCK[1].stop - 1)), 0)
    return np.hypot(dx, dy)


def test_no_ringing_next_to_a_no_data_block():
    intact = _make_pair(5, 4.5, 3.5)
    pair = _with_no_data_block(intact)
    result = zogy_subtract(pair.science, pair.template)
    diff = result.difference
    assert np.isfinite(diff.image).all() and np.isfinite(result.score).all()
    assert diff.mask.is_set("NO_DATA")[BLOCK].all()
    assert np.isinf(diff.variance[BLOCK]).all() and (diff.image[BLOCK] == 0).all()
    edge = diff.mask.is_set("EDGE")
    dist = _distance_to_block()
    # The taper zone around the block (and nothing far from it) is EDGE.
    assert edge[(dist > 0) & (dist < 3)].all()
    interior = (dist > 40) & ~edge
    assert interior.sum() > 0.8 * (dist > 40).sum()
    chi = diff.image / np.sqrt(diff.variance)
    ring = ~edge & (dist > 0) & (dist < 40) & _source_free(pair, result)
    assert ring.sum() > 3000
    assert abs(np.mean(chi[ring])) < 0.1
    assert abs(np.std(chi[ring]) - 1) < 0.08
    assert np.abs(chi[ring]).max() < 5
    assert abs(np.std(result.score[ring]) - 1) < 0.15
    # Beyond the taper, D is what it would be without the block (to ~0.3% of the noise).
    reference = zogy_subtract(intact.science, intact.template).difference
    change = (diff.image - reference.image)[ring] / np.sqrt(reference.variance[ring])
    assert np.sqrt(np.mean(change**2)) < 0.01
    assert np.abs(change).max() < 0.1


def test_taper_suppresses_residuals_of_stars_cut_by_masks_and_edges():
    """Bright stars (S/N ~ 500) cut by the NO_DATA block and by the image edges."""
    star_xy = np.array([[2.3, 100.0], [150.0, 1.4], [509.6, 350.0], [300.0, 510.2],
                        [240.0, 197.0], [198.0, 230.0]])
    pair = _with_no_data_block(_make_pair(9, 4.5, 3.5, with_transients=False, star_xy=star_xy,
                                          star_flux=40000.0))
    worst = {}
    for taper in (0, None):
        config = ZogyConfig(taper=taper, flux_ratio=1.0)
        diff = zogy_subtract(pair.science, pair.template, config).difference
        usable = ~diff.mask.is_set(["EDGE", "NO_DATA"])
        worst[taper] = float(np.abs(diff.image / np.sqrt(diff.variance))[usable].max())
    assert worst[None] < 6
    assert worst[0] > 3 * worst[None]


def test_psf_model_off_centre_is_recentred():
    """A template PSF model offset by a third of a pixel would make every star a dipole."""
    pair = _make_pair(13, 4.5, 3.5)
    psf_t = pair.template.psf
    kernel = psf_t.image_at(255.5, 255.5)
    shifted = shift_kernels(kernel[None], np.array([0.3]), np.array([-0.2]))[0]
    pair.template.psf = GridPsf(np.array([255.5]), np.array([255.5]), shifted[None, None])
    recentred = zogy_subtract(pair.science, pair.template)
    assert recentred.quality["psf_shift_template"] == pytest.approx(np.hypot(0.3, 0.2), abs=0.02)
    assert recentred.quality["psf_shift_science"] == 0.0
    chi = _star_chi(pair, recentred)
    assert np.median(chi) <= 1.1 and np.percentile(chi, 90) < 1.4
    as_given = zogy_subtract(pair.science, pair.template, ZogyConfig(recenter_psf=False))
    assert np.percentile(_star_chi(pair, as_given), 90) > 2


def test_source_noise_correction_of_the_score():
    """Bright stars with Poisson noise: S_corr stays Gaussian there, not only in the sky."""
    rng = np.random.default_rng(21)
    pair = _make_pair(21, 4.5, 3.5, with_transients=False, noise=False)
    for exp, sigma in ((pair.science, SIGMA_SCIENCE), (pair.template, SIGMA_TEMPLATE)):
        star_light = exp.image.copy()
        exp.variance = (sigma**2 + star_light).astype(np.float32)  # gain 1 Poisson term
        exp.image = (star_light + rng.normal(0.0, 1.0, SHAPE) * np.sqrt(exp.variance))
        exp.image = exp.image.astype(np.float32)
    result = zogy_subtract(pair.science, pair.template)
    bright = pair.stars[pair.stars[:, 2] > 20000]
    assert len(bright) > 10
    values = np.concatenate([
        result.score[round(y) - 2:round(y) + 3, round(x) - 2:round(x) + 3]
        .ravel() for x, y, _ in bright
        if 10 < x < SHAPE[1] - 10 and 10 < y < SHAPE[0] - 10])
    assert 0.8 < np.std(values) < 1.25
    assert np.abs(values).max() < 5.5
    chi = _star_chi(pair, result)
    assert np.median(chi) <= 1.1


def test_astrometric_noise_term_tames_misregistered_stars():
    """Template registered 0.15 px off: bright stars turn into dipoles unless S_corr knows."""
    pair = _make_pair(17, 4.5, 3.5, with_transients=False, star_flux=30000.0, n_stars=60,
                      template_offset=0.15)
    peaks = {}
    for sigma in (0.0, 0.15):
        result = zogy_subtract(pair.science, pair.template,
                               ZogyConfig(astrometric_sigma=(sigma, sigma)))
        peaks[sigma] = max(
            float(np.abs(result.score[int(y) - 3:int(y) + 4, int(x) - 3:int(x) + 4]).max())
            for x, y, _ in pair.stars if 10 < x < SHAPE[1] - 10 and 10 < y < SHAPE[0] - 10)
    assert peaks[0.0] > 8
    assert peaks[0.15] < 0.6 * peaks[0.0]
    assert peaks[0.15] < 6


def test_mask_planes_are_combined():
    pair = _make_pair(19, 4.5, 3.5, n_stars=60)
    pair.science.mask.set("INJECTED", (slice(10, 20), slice(10, 20)))
    pair.template.mask.set("INJECTED", (slice(30, 40), slice(30, 40)))
    pair.template.mask.set("CR", (slice(50, 52), slice(60, 70)))
    pair.science.mask.set("DETECTED", (slice(100, 110), slice(100, 110)))
    pair.science.mask.set("SAT", (slice(300, 303), slice(300, 303)))
    mask = zogy_subtract(pair.science, pair.template).difference.mask
    assert mask.is_set("INJECTED")[10:20, 10:20].all()
    assert not mask.is_set("INJECTED")[30:40, 30:40].any()
    assert mask.is_set("INJECTED_TEMPLATE")[30:40, 30:40].all()
    assert not mask.is_set("INJECTED_TEMPLATE")[10:20, 10:20].any()
    assert mask.is_set("CR")[50:52, 60:70].all()
    assert mask.is_set("SAT")[300:303, 300:303].all()
    assert not mask.is_set("DETECTED").any()


def test_bad_inputs_give_clear_errors():
    pair = _make_pair(23, 4.5, 3.5, n_stars=50)
    small = Exposure(pair.template.image[:256], pair.template.variance[:256],
                     psf=pair.template.psf)
    with pytest.raises(InputError, match="shape"):
        zogy_subtract(pair.science, small)
    no_psf = pair.template.copy()
    no_psf.psf = None
    with pytest.raises(InputError, match="PSF"):
        zogy_subtract(pair.science, no_psf)
    with pytest.raises(InputError, match="mask_sources"):
        zogy_subtract(pair.science, pair.template, mask_sources=np.zeros((10, 10), bool))
    with pytest.raises(pydantic.ValidationError):
        ZogyConfig(tapr=3)
    no_variance = pair.template.copy()
    no_variance.variance[:] = 0.0
    with pytest.raises(InputError, match="variance"):
        zogy_subtract(pair.science, no_variance)
    # Pure noise: no star to fit the flux ratio and no calibration to fall back on.
    noise_only = _make_pair(23, 4.5, 3.5, n_stars=0, with_transients=False)
    with pytest.raises(StageError, match="flux ratio"):
        zogy_subtract(noise_only.science, noise_only.template)
    # ... but an explicit ratio is enough.
    result = zogy_subtract(noise_only.science, noise_only.template, ZogyConfig(flux_ratio=1.0))
    assert abs(result.quality["noise_ratio"] - 1) < 0.02


def test_variance_follows_spatially_varying_input_noise():
    """Science noise growing 4x in variance across the image, template noise uniform."""
    rng = np.random.default_rng(31)
    pair = _make_pair(31, 4.5, 3.5, noise=False)
    x = np.arange(SHAPE[1])[None, :] * np.ones(SHAPE)
    sigma = SIGMA_SCIENCE * (0.7 + 0.7 * x / SHAPE[1])  # 0.7 to 1.4 times
    pair.science.image = (pair.science.image + rng.normal(0.0, 1.0, SHAPE) * sigma
                          ).astype(np.float32)
    pair.science.variance = (sigma**2).astype(np.float32)
    pair.template.image = (pair.template.image + rng.normal(0.0, SIGMA_TEMPLATE, SHAPE)
                           ).astype(np.float32)
    result = zogy_subtract(pair.science, pair.template)
    diff = result.difference
    free = _source_free(pair, result)
    for columns in (slice(0, 170), slice(342, 512)):
        sel = free[:, columns]
        chi = diff.image[:, columns][sel] / np.sqrt(diff.variance[:, columns][sel])
        assert abs(np.std(chi) - 1) < 0.03
        assert abs(np.std(result.score[:, columns][sel]) - 1) < 0.06
    left = np.median(diff.variance[:, 20:60][free[:, 20:60]])
    right = np.median(diff.variance[:, 450:490][free[:, 450:490]])
    assert right / left > 2.5


def test_difference_survives_a_fits_round_trip(tmp_path):
    pair = _with_no_data_block(_make_pair(37, 4.5, 3.5, n_stars=80))
    pair.science.photo_calib = PhotoCalib(2.0)
    result = zogy_subtract(pair.science, pair.template)
    path = result.difference.write_fits(tmp_path / "diff.fits")
    back = Exposure.from_fits(path, require_wcs=False)
    np.testing.assert_array_equal(back.image, result.difference.image)
    np.testing.assert_array_equal(back.mask.array, result.difference.mask.array)
    np.testing.assert_array_equal(back.variance, result.difference.variance)  # inf included
    np.testing.assert_allclose(back.psf.image_at(0.0, 0.0),
                               result.difference.psf.image_at(0.0, 0.0), atol=1e-7)
    assert back.photo_calib.calibration_mean == pytest.approx(2.0)


def test_tiles_agree_with_one_region_when_the_psf_is_constant():
    pair = _make_pair(41, 4.5, 3.5)
    # The same flux ratio for both (fits group the stars by tile, so they differ slightly).
    whole = zogy_subtract(pair.science, pair.template,
                          ZogyConfig(tile_size=None, flux_ratio=1.0))
    tiled = zogy_subtract(pair.science, pair.template, ZogyConfig(tile_size=256, flux_ratio=1.0))
    assert whole.quality["n_tiles"] == 1 and tiled.quality["n_tiles"] == 4
    assert tiled.difference.psf.images.shape[:2] == (2, 2)
    inner = ~whole.difference.mask.is_set("EDGE")  # the taper zone has ~0 variance
    sigma = np.sqrt(whole.difference.variance)
    change = (tiled.difference.image - whole.difference.image) / sigma
    assert np.abs(change[inner]).max() < 1e-3
    np.testing.assert_allclose(tiled.difference.variance[inner],
                               whole.difference.variance[inner], rtol=1e-4)
    assert np.abs(tiled.score - whole.score)[inner].max() < 1e-2


def test_tiles_follow_a_spatially_varying_psf():
    """Science FWHM from ~3.7 to ~5.3 px across the image: one PSF pair cannot null the stars."""
    height, width = SHAPE
    psfs = (MoffatPsf(width, height, fwhm_coeffs=[4.5, 0.4, 0.3], g1_coeffs=[0.06, 0.03],
                      g2_coeffs=[-0.03]),
            MoffatPsf(width, height, fwhm_coeffs=[3.5, -0.2, 0.25], g1_coeffs=[-0.04],
                      g2_coeffs=[0.05, 0.02]))
    pair = _make_pair(3, 4.5, 3.5, psfs=psfs)
    whole = zogy_subtract(pair.science, pair.template, ZogyConfig(tile_size=None))
    tiled = zogy_subtract(pair.science, pair.template, ZogyConfig(tile_size=256))
    chi_whole, chi_tiled = _star_chi(pair, whole), _star_chi(pair, tiled)
    assert np.percentile(chi_whole, 90) > 1.7
    assert np.percentile(chi_tiled, 90) < 1.45 and np.median(chi_tiled) <= 1.1
    # The flux ratio is fitted with the PSFs valid at each star, tiled or not.
    assert whole.flux_ratio == pytest.approx(1.0, abs=0.003)
    assert tiled.flux_ratio == pytest.approx(1.0, abs=0.003)
    x, y, flux = pair.transient
    assert _psf_flux(tiled, x, y)[0] == pytest.approx(flux, rel=0.01)


def test_without_the_score_the_difference_is_the_same(subtracted):
    """``with_score=False`` skips a third of the transforms; the difference, its variance, PSF
    and every quality number stay exactly as they are."""
    pair, full = subtracted
    bare = zogy_subtract(pair.science, pair.template, with_score=False)
    assert bare.score is None and full.score is not None
    assert np.array_equal(bare.difference.image, full.difference.image)
    assert np.array_equal(bare.difference.variance, full.difference.variance)
    assert np.array_equal(bare.difference.mask.array, full.difference.mask.array)
    assert np.array_equal(bare.difference.psf.images, full.difference.psf.images)
    np.testing.assert_equal(bare.quality, full.quality)  # NaN where both are NaN


def test_kernels_stay_compact_for_psf_stamps_with_hard_edges(monkeypatch):
    """Fitted PSF models are square stamps standing on a floor of 1-2e-3 of their peak (the
    bench pair's), so they end in a step. Rolled off before the kernels are made, the
    kernels keep all but 1e-5 of their power within ~20 px; with the steps left in, not
    within the 128 px cap."""
    from apqa.pipeline.diffim import zogy_kernels
    from apqa.pipeline.diffim.zogy_kernels import _soft_edge, _zogy_kernels

    def moffat_stamp(size: int, fwhm: float, floor: float = 1e-3) -> np.ndarray:
        half = size // 2
        yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
        alpha = fwhm / (2 * np.sqrt(2 ** (1 / 3.5) - 1))
        stamp = (1 + (xx**2 + yy**2) / alpha**2) ** -3.5 + floor
        return stamp / stamp.sum()

    pn, pr = moffat_stamp(33, 4.5), moffat_stamp(25, 3.4)
    args = (pn, pr, 6.0, 4.0, 1.0, 1e-12, None, 1e-5, 128, 33)
    kernels = _zogy_kernels(*args, with_score=False)
    assert kernels.radius < 30 and kernels.truncation <= 1e-5
    monkeypatch.setattr(zogy_kernels, "_soft_edge", lambda kernel: kernel)
    assert _zogy_kernels(*args, with_score=False).radius == 128
    # A small stamp keeps its core: at most 40% of its radius is rolled off.
    small = moffat_stamp(11, 2.0, floor=0.0)
    soft = _soft_edge(small)
    ratio = soft / small
    assert np.allclose(ratio[4:7, 4:7], ratio[5, 5])
    assert soft.sum() == pytest.approx(1.0)


def test_inner_tile_sides_are_not_padded():
    from scipy.fft import next_fast_len

    from apqa.pipeline.diffim.zogy_tiles import _tile_length

    assert _tile_length(0, 1184, 4096, 128) == next_fast_len(1184 + 128)
    assert _tile_length(2912, 4096, 4096, 128) == next_fast_len(1184 + 128)
    assert _tile_length(864, 2208, 4096, 128) == next_fast_len(1344)


def test_tiles_in_threads_give_the_same_result():
    """Two tiles at a time in two threads (a budget of two cores) or one after the other:
    added in tile order, the outputs are identical bit for bit."""
    pair = _make_pair(41, 4.5, 3.5)
    serial = zogy_subtract(pair.science, pair.template, ZogyConfig(tile_size=256, workers=1))
    threaded = zogy_subtract(pair.science, pair.template, ZogyConfig(tile_size=256, workers=2))
    assert serial.quality["n_tiles"] == 4
    assert np.array_equal(serial.difference.image, threaded.difference.image)
    assert np.array_equal(serial.difference.variance, threaded.difference.variance)
    assert np.array_equal(serial.score, threaded.score)
