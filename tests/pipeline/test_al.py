"""Alard-Lupton PSF matching with decorrelation, on aligned synthetic pairs with known truth."""

from __future__ import annotations

import numpy as np
import pytest

from apqa.errors import StageError
from apqa.pipeline.diffim.al import AlConfig, al_subtract, decorrelation_kernel
from apqa.pipeline.diffim.al_kernel import solve_normal
from apqa.pipeline.photometry import psf_flux

from .synthetic_pairs import make_pair


def _source_free(pair, shape, radius=15, edge=40):
    far = np.ones(shape, bool)
    for x, y, _ in np.vstack([pair.stars, pair.transients]):
        far[max(0, int(y) - radius):int(y) + radius + 1,
            max(0, int(x) - radius):int(x) + radius + 1] = False
    far[:edge] = far[-edge:] = False
    far[:, :edge] = far[:, -edge:] = False
    return far


def _median_chi(pair, diff, min_flux=2e4, half=9):
    chis = []
    for x, y, flux in pair.stars:
        if flux < min_flux:
            continue
        ix, iy = round(x), round(y)
        box = np.s_[iy - half:iy + half + 1, ix - half:ix + half + 1]
        chis.append(np.sqrt(np.mean(diff.image[box] ** 2 / diff.variance[box])))
    return float(np.median(chis))


@pytest.fixture(scope="module")
def template_sharper():
    pair = make_pair(fwhm_science=4.5, fwhm_template=3.5, flux_ratio=1.3,
                     transient_flux=(5000.0,), vanished_flux=(-5000.0,), seed=4)
    return pair, al_subtract(pair.science, pair.template)


@pytest.fixture(scope="module")
def science_sharper():
    pair = make_pair(fwhm_science=3.5, fwhm_template=4.5, flux_ratio=1.3,
                     sigma_science=3.0, sigma_template=5.0,
                     transient_flux=(5000.0,), vanished_flux=(-5000.0,), seed=5)
    return pair, al_subtract(pair.science, pair.template)


@pytest.mark.parametrize("name", ["template_sharper", "science_sharper"])
def test_noise_matches_variance_plane(name, request):
    pair, result = request.getfixturevalue(name)
    diff = result.difference
    far = _source_free(pair, diff.shape)
    ratio = np.std(diff.image[far] / np.sqrt(diff.variance[far]))
    assert ratio == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("name", ["template_sharper", "science_sharper"])
def test_transient_fluxes_and_signs(name, request):
    pair, result = request.getfixturevalue(name)
    diff = result.difference
    flux, err, _, _ = psf_flux(diff.image, diff.variance, np.ones(diff.shape, bool), diff.psf,
                               pair.transients[:, 0], pair.transients[:, 1])
    appeared, vanished = pair.transients[:, 2] > 0, pair.transients[:, 2] < 0
    assert flux[appeared] == pytest.approx(pair.transients[appeared, 2], rel=0.01)
    assert flux[vanished] == pytest.approx(pair.transients[vanished, 2], rel=0.02)
    assert np.all(err > 0)


def test_kernel_sum_is_the_photometric_ratio(template_sharper, science_sharper):
    _, convolve_template = template_sharper
    _, convolve_science = science_sharper
    assert convolve_template.quality["convolved"] == 0.0
    assert convolve_template.quality["kernel_sum"] == pytest.approx(1 / 1.3, rel=0.01)
    assert convolve_science.quality["convolved"] == 1.0
    assert convolve_science.quality["kernel_sum"] == pytest.approx(1.3, rel=0.01)


@pytest.mark.parametrize("name", ["template_sharper", "science_sharper"])
def test_constant_stars_leave_noise(name, request):
    pair, result = request.getfixturevalue(name)
    assert _median_chi(pair, result.difference) <= 1.1


def test_difference_psf_is_normalized_and_broadened(template_sharper):
    pair, result = template_sharper
    kernel = result.difference.psf.image_at(256.0, 256.0)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-6)
    assert result.difference.psf.fwhm_at(256.0, 256.0) > 0.9 * pair.science.psf.fwhm_at(256, 256)


def test_decorrelation_kernel_preserves_flux_and_whitens():
    half = 10
    r2 = np.arange(-half, half + 1)[:, None] ** 2 + np.arange(-half, half + 1)[None, :] ** 2
    kernel = np.exp(-r2 / 8.0)
    kernel *= 0.8 / kernel.sum()
    phi = decorrelation_kernel(kernel, 25.0, 9.0, 41)
    assert phi.sum() == pytest.approx(1.0)
    assert phi[20, 20] == phi.max()
    # The difference's noise spectrum u_var + c_var |K|^2 times |phi|^2 is flat.
    n = 128
    k_hat = np.abs(np.fft.fft2(kernel, s=(n, n)))
    phi_hat = np.abs(np.fft.fft2(phi, s=(n, n)))
    spectrum = (25.0 + 9.0 * k_hat**2) * phi_hat**2
    assert np.ptp(spectrum) / spectrum.mean() < 0.02


def test_matched_seeing_leaves_unconstrained_terms_out():
    # Same seeing in both images: the basis Gaussians shrink below a pixel and several of
    # their polynomial terms become the same image. Those combinations are left out of the
    # solve instead of getting huge cancelling coefficients.
    pair = make_pair(fwhm_science=4.0, fwhm_template=4.0, flux_ratio=1.3,
                     transient_flux=(5000.0,), vanished_flux=(-5000.0,), seed=6)
    result = al_subtract(pair.science, pair.template)
    q, diff = result.quality, result.difference
    assert q["n_unconstrained_terms"] >= 1
    assert q["condition_number"] < 1e10
    assert q["kernel_sum"] == pytest.approx(1 / 1.3, rel=0.01)
    far = _source_free(pair, diff.shape)
    assert np.std(diff.image[far] / np.sqrt(diff.variance[far])) == pytest.approx(1.0, abs=0.02)
    assert _median_chi(pair, diff) <= 1.1


def test_solve_normal_matches_a_plain_solve_when_well_posed():
    rng = np.random.default_rng(3)
    design = rng.normal(size=(200, 12)) * np.logspace(0, 4, 12)  # badly scaled columns
    normal, rhs = design.T @ design, design.T @ rng.normal(size=200)
    coeffs, condition, dropped = solve_normal(normal, rhs)
    assert dropped == 0
    np.testing.assert_allclose(coeffs, np.linalg.solve(normal, rhs), rtol=1e-9)
    # The scaled condition number, not the raw one that the column scales inflate.
    assert condition < 1e3 < np.linalg.cond(normal)


def test_too_few_candidates_is_a_stage_error():
    pair = make_pair(n_stars=3, transient_flux=(), vanished_flux=())
    with pytest.raises(StageError, match=r"too few kernel candidates: found \d+"):
        al_subtract(pair.science, pair.template, AlConfig(min_candidates=10))


def test_al_and_zogy_agree_on_a_bright_transient():
    from apqa.pipeline.diffim.zogy import ZogyConfig, zogy_subtract

    pair = make_pair(fwhm_science=4.5, fwhm_template=3.5, flux_ratio=1.0,
                     transient_flux=(20000.0,), vanished_flux=(), seed=9)
    x, y = pair.transients[:, 0], pair.transients[:, 1]
    fluxes = []
    for diff in (al_subtract(pair.science, pair.template).difference,
                 # Tiles of 256 px follow this small image's PSF variation as 1024-px tiles
                 # follow a 4k detector's.
                 zogy_subtract(pair.science, pair.template,
                               ZogyConfig(tile_size=256)).difference):
        usable = np.isfinite(diff.variance)
        fluxes.append(psf_flux(diff.image, diff.variance, usable, diff.psf, x, y)[0][0])
    assert fluxes[0] == pytest.approx(fluxes[1], rel=0.01)
    assert fluxes[0] == pytest.approx(20000.0, rel=0.01)


def test_without_decorrelation_the_variance_plane_still_holds():
    pair = make_pair(fwhm_science=4.5, fwhm_template=3.5, flux_ratio=1.3, seed=12)
    diff = al_subtract(pair.science, pair.template, AlConfig(decorrelate=False)).difference
    far = _source_free(pair, diff.shape)
    ratio = np.std(diff.image[far] / np.sqrt(diff.variance[far]))
    assert ratio == pytest.approx(1.0, abs=0.02)


def test_the_residual_background_can_be_kept(template_sharper):
    pair, default = template_sharper
    kept = al_subtract(pair.science, pair.template,
                       AlConfig(residual_background_mesh=None)).difference
    # The simulated pair has no background left to remove: the two differ by far less than
    # the noise, and the masks and variances are the same.
    far = _source_free(pair, kept.shape)
    change = (kept.image - default.difference.image)[far] / np.sqrt(kept.variance[far])
    assert 0 < np.sqrt(np.mean(change**2)) < 0.05
    assert np.array_equal(kept.mask.array, default.difference.mask.array)
    assert np.array_equal(kept.variance, default.difference.variance)


@pytest.mark.parametrize("sigmas, degrees, half", [((0.7, 1.4, 2.8), (4, 2, 2), 10),
                                                   ((1.5, 3.0, 6.0), (4, 2, 2), 17),
                                                   ((1.0,), (1,), 3)])
def test_stamps_convolved_by_separable_profiles_equal_2d_convolution(sigmas, degrees, half):
    from scipy.signal import convolve2d

    from apqa.pipeline.diffim.al_kernel import _convolve_stamps, gaussian_poly_basis

    basis = gaussian_poly_basis(list(sigmas), degrees, half)
    # The separable factors rebuild every basis image.
    raw = np.einsum("ty,tx->tyx", basis.profiles[basis.ys], basis.profiles[basis.xs])
    assert np.allclose(np.einsum("bt,tyx->byx", basis.mix, raw), basis.images, atol=1e-14)
    stamps = np.random.default_rng(4).normal(100.0, 30.0, (21, 2 * half + 31, 2 * half + 31))
    convolved = _convolve_stamps(stamps, basis, chunk=8)  # a ragged last chunk too
    assert convolved.shape == (21, len(basis.images), 31, 31)
    for n in (0, 13, 20):
        for b in range(len(basis.images)):
            truth = convolve2d(stamps[n], basis.images[b], mode="valid")
            assert np.abs(convolved[n, b] - truth).max() < 1e-10 * np.abs(truth).max()
