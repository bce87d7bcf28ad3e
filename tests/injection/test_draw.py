"""Drawing fakes: flux and position accuracy, noise and variance, masks, flags, determinism."""

from __future__ import annotations

import galsim
import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from apqa.datamodel import GridPsf, MoffatPsf, PolynomialPsf
from apqa.datamodel.psf import polynomial_terms
from apqa.errors import InputError
from apqa.injection.draw import InjectionFlag, inject
from apqa.pipeline.photometry import psf_flux

from .conftest import GAIN, SCALE, counts_of, make_exposure


def grid_catalog(exposure, n_side_x=10, n_side_y=20, seed=0, mag=(18.0, 21.0)):
    """Isolated point fakes on a jittered grid (>= 60 px apart), random sub-pixel positions."""
    rng = np.random.default_rng(seed)
    gx, gy = np.meshgrid(np.linspace(40, exposure.width - 41, n_side_x),
                         np.linspace(40, exposure.height - 41, n_side_y))
    n = gx.size
    return pd.DataFrame({
        "injection_id": np.arange(n), "kind": "point",
        "x": gx.ravel() + rng.uniform(-8, 8, n), "y": gy.ravel() + rng.uniform(-8, 8, n),
        "mag": rng.uniform(*mag, n)})


def fitted_position(image, psf, x, y, axis, step=0.04):
    """Position along ``axis`` maximizing the PSF-fit flux (parabola through 3 offsets)."""
    usable = np.ones(image.shape, bool)
    var = np.ones(image.shape, np.float32)
    values = []
    for d in (-step, 0.0, step):
        px, py = (x + d, y) if axis == 0 else (x, y + d)
        values.append(psf_flux(image, var, usable, psf, np.atleast_1d(px),
                               np.atleast_1d(py))[0][0])
    fm, f0, fp = values
    return (x if axis == 0 else y) + step * (fm - fp) / (2 * (fm - 2 * f0 + fp))


def polynomial_from(moffat: MoffatPsf, order: int = 3) -> PolynomialPsf:
    """A pixel-basis PSF fitted (per pixel, least squares) to a Moffat model on a 9 x 9 grid."""
    xs, ys = np.meshgrid(np.linspace(0, moffat.width - 1, 9), np.linspace(0, moffat.height - 1, 9))
    kernels = np.stack([moffat.image_at(a, b) for a, b in zip(xs.ravel(), ys.ravel(),
                                                               strict=True)])
    u = (xs.ravel() - (moffat.width - 1) / 2) / (moffat.width / 2)
    v = (ys.ravel() - (moffat.height - 1) / 2) / (moffat.height / 2)
    terms = polynomial_terms(u, v, order)  # (T, N)
    coeffs, *_ = np.linalg.lstsq(terms.T, kernels.reshape(len(kernels), -1), rcond=None)
    return PolynomialPsf(moffat.width, moffat.height, coeffs.reshape(-1, *kernels.shape[1:]),
                         order)


@pytest.mark.parametrize("model", ["moffat", "grid", "polynomial"])
def test_point_flux_and_position_across_varying_psf(model):
    exposure = make_exposure()
    moffat = exposure.psf
    # The truth is the exposure's own PSF model: analytic, a grid of images, or a polynomial.
    exposure.psf = {"moffat": moffat, "grid": moffat.to_grid(5, 9),
                    "polynomial": polynomial_from(moffat)}[model]
    fwhm = [exposure.psf.fwhm_at(x, y) for x, y in ((0, 0), (1023, 2047), (512, 1024))]
    assert max(fwhm) / min(fwhm) > 1.05  # the PSF really varies over the image
    catalog = grid_catalog(exposure)
    out, drawn = inject(exposure, catalog, noise=False)
    assert (drawn["injection_flag"] == 0).all()
    x, y = drawn["x"].to_numpy(), drawn["y"].to_numpy()
    flux, _, _, _ = psf_flux(out.image, out.variance, np.ones(out.shape, bool), exposure.psf,
                             x, y)
    ratio = flux / counts_of(drawn["mag"].to_numpy())
    assert np.abs(ratio - 1).max() < 0.002
    # Total flux is exact (the stamps hold all the light).
    assert out.image.sum() == pytest.approx(counts_of(drawn["mag"]).sum(), rel=1e-5)
    for k in range(0, len(x), 7):
        assert abs(fitted_position(out.image, exposure.psf, x[k], y[k], 0) - x[k]) < 0.01
        assert abs(fitted_position(out.image, exposure.psf, x[k], y[k], 1) - y[k]) < 0.01


def test_positions_from_sky_coordinates(blank):
    catalog = grid_catalog(blank, 3, 3)
    ra, dec = blank.pixel_to_sky(catalog["x"], catalog["y"])
    sky = catalog.drop(columns=["x", "y"]).assign(ra=ra, dec=dec)
    out_pix, _ = inject(blank, catalog, noise=False)
    out_sky, drawn = inject(blank, sky, noise=False)
    assert np.allclose(drawn["x"], catalog["x"], atol=1e-6)
    assert np.allclose(out_sky.image, out_pix.image, atol=1e-3)


def _galsim_reference(profile, jac, kernel, offset, size):
    """GalSim's own drawing: profile * InterpolatedImage(PSF), method no_pixel, odd stamp."""
    local = galsim.JacobianWCS(*jac.ravel())
    psf = galsim.InterpolatedImage(galsim.ImageD(kernel.astype(np.float64), scale=1.0))
    conv = galsim.Convolve(local.toImage(profile), psf)
    return conv.drawImage(nx=size, ny=size, scale=1.0, method="no_pixel", offset=offset).array


def test_extended_kinds_flux_shape_and_galsim_agreement(blank, tmp_path):
    stamp = np.outer(np.hanning(21), np.hanning(15)) + 0.01
    stamp_path = tmp_path / "blob.fits"
    header = fits.Header()
    header["PIXSCALE"] = 0.1
    fits.PrimaryHDU(stamp, header=header).writeto(stamp_path)
    catalog = pd.DataFrame({
        "injection_id": [1, 2, 3, 4], "kind": ["sersic", "sersic", "trail", "stamp"],
        "x": [200.3, 700.6, 400.1, 600.8], "y": [300.7, 1500.2, 1000.4, 400.5],
        "mag": [19.0, 19.5, 19.2, 19.8],
        "n": [1.0, 4.0, np.nan, np.nan], "half_light_radius": [1.2, 0.5, np.nan, np.nan],
        "q": [0.5, 0.8, np.nan, np.nan], "beta": [30.0, 100.0, np.nan, np.nan],
        "trail_length": [np.nan, np.nan, 8.0, np.nan],
        "trail_angle": [np.nan, np.nan, 0.0, np.nan],
        "stamp": [None, None, None, str(stamp_path)]})
    out, drawn = inject(blank, catalog, noise=False)
    assert (drawn["injection_flag"] == 0).all()
    expected = counts_of(drawn["mag"].to_numpy())
    for k, (x, y) in enumerate(zip(drawn["x"], drawn["y"], strict=True)):
        ix, iy = round(x), round(y)
        box = out.image[iy - 80:iy + 81, ix - 80:ix + 81]
        assert box.sum() == pytest.approx(expected[k], rel=1e-4)  # flux is exact
    # The Sersic galaxy against GalSim's own convolution with the PSF image.
    from apqa.injection.profiles import world_profile
    from apqa.sim.render import local_jacobians

    x, y = 200.3, 300.7
    jac = local_jacobians(blank.wcs, np.array([x]), np.array([y]))[0]
    profile, _ = world_profile("sersic", {"n": 1.0, "half_light_radius": 1.2, "q": 0.5,
                                          "beta": 30.0}, expected[0], SCALE, 5.0, 0.05)
    ref = _galsim_reference(profile, jac, blank.psf.image_at(x, y), (x - 200, y - 301), 101)
    ours = out.image[301 - 50:301 + 51, 200 - 50:200 + 51]
    assert np.abs(ours - ref).max() < 2e-3 * ref.max()
    # The trail lies along +u (west), which is +x with north up and east left: long in x,
    # by a uniform line's variance L^2 / 12 over a point source's moments at the same place.
    point, _ = inject(blank, catalog.iloc[[2]].assign(kind="point"), noise=False)
    (txx, tyy), (pxx, pyy) = (moments(img, 400.1, 1000.4) for img in (out.image, point.image))
    assert txx - pxx == pytest.approx((8.0 / SCALE) ** 2 / 12, rel=0.01)
    assert tyy == pytest.approx(pyy, rel=0.01)


def moments(image, x, y, half=40):
    """Unweighted second moments (xx, yy) of the light within ``half`` px of (x, y)."""
    ix, iy = round(x), round(y)
    cut = image[iy - half:iy + half + 1, ix - half:ix + half + 1].astype(np.float64)
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    xx, yy = xx + ix - x, yy + iy - y
    return (cut * xx**2).sum() / cut.sum(), (cut * yy**2).sum() / cut.sum()


def test_wcs_rotation_turns_trails():
    exposure = make_exposure(512, 512, rotation_deg=90.0)
    catalog = pd.DataFrame({"injection_id": [0], "kind": ["trail"], "x": [256.0],
                            "y": [256.0], "mag": [18.0], "trail_length": [8.0],
                            "trail_angle": [0.0]})
    out, _ = inject(exposure, catalog, noise=False)
    ixx, iyy = moments(out.image, 256.0, 256.0)
    # With the sky rotated by 90 degrees, the east-west trail runs along y on the pixels.
    assert iyy - ixx == pytest.approx((8.0 / SCALE) ** 2 / 12, rel=0.02)


def test_noise_matches_variance_plane(blank):
    catalog = grid_catalog(blank, mag=(15.0, 16.0))
    clean, _ = inject(blank, catalog, noise=False)
    noisy, _ = inject(blank, catalog, noise=True, seed=3)
    model = clean.image.astype(np.float64)
    added = (noisy.variance - blank.variance).astype(np.float64)
    lit = model > 1.0
    assert np.allclose(added[lit], model[lit] / GAIN, rtol=1e-4)
    assert (added[model == 0] == 0).all()
    pull = (noisy.image - clean.image)[lit] / np.sqrt(added[lit])
    assert abs(pull.mean()) < 0.01
    assert pull.std() == pytest.approx(1.0, abs=0.01)
    assert noisy.image.sum() == pytest.approx(clean.image.sum(), rel=1e-3)


def test_mask_planes_over_the_stamps(blank):
    catalog = grid_catalog(blank, 3, 3)
    sci, _ = inject(blank, catalog, noise=False)
    lit = sci.image != 0
    assert (sci.mask.is_set("INJECTED") == lit).all()
    assert not sci.mask.is_set("INJECTED_TEMPLATE").any()
    # Each point stamp covers the PSF's full footprint (odd kernel side squared, or nearly).
    k = blank.psf.stamp_size()
    assert lit.sum() > 0.75 * 9 * k * k
    tpl, _ = inject(blank, catalog.assign(target="template"), noise=False,
                    target="template")
    assert (tpl.mask.is_set("INJECTED_TEMPLATE") == (tpl.image != 0)).all()
    assert not tpl.mask.is_set("INJECTED").any()


class HalfBrokenPsf:
    """A PSF model that cannot evaluate on the right half of the image (NaN kernels there)."""

    def __init__(self, base: MoffatPsf) -> None:
        self.base = base

    def image_at(self, x, y):
        kernel = self.base.image_at(x, y)
        return kernel * np.nan if x > self.base.width / 2 else kernel

    @property
    def fwhm(self):
        return self.base.fwhm

    def fwhm_at(self, x, y):
        return self.base.fwhm_at(x, y)


def test_each_flag_bit(blank, tmp_path):
    not_fits = tmp_path / "stamp.txt"
    not_fits.write_text("not a FITS file")
    rows = [
        ("point", 100.0, 100.0, np.nan, {}, InjectionFlag.BAD_MAG),
        ("point", -30.0, 100.0, 20.0, {}, InjectionFlag.OFF_IMAGE),
        ("sersic", 300.0, 300.0, 20.0, {"n": 1.0, "half_light_radius": 400.0, "q": 1.0,
                                        "beta": 0.0}, InjectionFlag.FFT_TOO_LARGE),
        ("point", 900.0, 300.0, 20.0, {}, InjectionFlag.PSF_FAILURE),
        ("sersic", 900.0, 900.0, 20.0, {"n": 1.0, "half_light_radius": 1.0, "q": 1.0,
                                        "beta": 0.0}, InjectionFlag.PSF_FAILURE),
        ("galaxy", 200.0, 700.0, 20.0, {}, InjectionFlag.UNKNOWN_KIND),
        ("sersic", 200.0, 900.0, 20.0, {"n": 9.0, "half_light_radius": 1.0, "q": 1.0,
                                        "beta": 0.0}, InjectionFlag.BAD_SHAPE),
        ("stamp", 200.0, 1100.0, 20.0, {"stamp": str(not_fits)}, InjectionFlag.BAD_SHAPE),
        ("point", 200.0, 1300.0, 20.0, {}, 0),
    ]
    catalog = pd.DataFrame([{"injection_id": i, "kind": k, "x": x, "y": y, "mag": m, **s}
                            for i, (k, x, y, m, s, _) in enumerate(rows)])
    blank.psf = HalfBrokenPsf(blank.psf)
    out, drawn = inject(blank, catalog, noise=False)
    assert drawn["injection_flag"].tolist() == [int(f) for *_, f in rows]
    assert drawn["injection_flag"].dtype == np.int32
    # Only the good fake was drawn, with its whole flux.
    assert out.image.sum() == pytest.approx(counts_of(20.0), rel=1e-5)
    assert out.image[1300, 200] > 0


def test_noise_is_deterministic_per_seed_visit_detector(blank):
    catalog = grid_catalog(blank, 3, 3, mag=(16.0, 17.0))
    a, _ = inject(blank, catalog, seed=5)
    b, _ = inject(blank, catalog, seed=5)
    assert np.array_equal(a.image, b.image)
    other_visit, _ = inject(make_exposure(visit=410002), catalog, seed=5)
    other_detector, _ = inject(blank, catalog, seed=5, detector=2)
    other_seed, _ = inject(blank, catalog, seed=6)
    clean, _ = inject(blank, catalog, noise=False)
    lit = clean.image > 1.0
    for other in (other_visit, other_detector, other_seed):
        diff = (other.image - a.image)[lit]
        assert np.count_nonzero(diff) > 0.99 * lit.sum()
    # Template noise is its own stream too.
    tpl, _ = inject(blank, catalog.assign(target="both"), seed=5, target="template")
    assert np.count_nonzero((tpl.image - a.image)[lit]) > 0.99 * lit.sum()


def test_variable_and_negative_targets(blank):
    catalog = pd.DataFrame({
        "injection_id": [0, 1, 2], "kind": "point", "x": [200.0, 500.0, 800.0],
        "y": [400.0, 400.0, 400.0], "mag": [20.0, 20.0, 19.0],
        "template_mag": [np.nan, 21.0, np.nan], "target": ["science", "both", "template"]})
    sci, sci_drawn = inject(blank, catalog, noise=False)
    tpl, tpl_drawn = inject(blank, catalog, noise=False, target="template")
    assert sci_drawn["injection_id"].tolist() == [0, 1]
    assert tpl_drawn["injection_id"].tolist() == [1, 2]

    def flux_near(image, x):
        return image[370:431, int(x) - 30:int(x) + 31].sum()

    assert flux_near(sci.image, 500) == pytest.approx(counts_of(20.0), rel=1e-4)
    assert flux_near(tpl.image, 500) == pytest.approx(counts_of(21.0), rel=1e-4)
    assert flux_near(tpl.image, 800) == pytest.approx(counts_of(19.0), rel=1e-4)
    assert flux_near(sci.image, 800) == 0


def test_input_errors(blank):
    catalog = grid_catalog(blank, 2, 2)
    blank.detector_info = None
    with pytest.raises(InputError, match=r"gain is nan .*--no-noise"):
        inject(blank, catalog)
    blank.photo_calib = None
    with pytest.raises(InputError, match="photometric calibration"):
        inject(blank, catalog, noise=False)
    with pytest.raises(InputError, match="missing columns"):
        inject(make_exposure(), catalog.drop(columns=["mag"]), noise=False)
    with pytest.raises(InputError, match="target 'coadd'"):
        inject(make_exposure(), catalog, target="coadd")


def test_grid_psf_kernel_sizes_and_empty_catalog(blank):
    psf = GridPsf(np.array([0.0, 1023.0]), np.array([0.0, 2047.0]),
                  np.stack([np.stack([blank.psf.image_at(0, 0)] * 2)] * 2))
    blank.psf = psf
    out, drawn = inject(blank, grid_catalog(blank, 0, 0), noise=False)
    assert len(drawn) == 0 and not out.image.any() and not out.mask.is_set("INJECTED").any()
