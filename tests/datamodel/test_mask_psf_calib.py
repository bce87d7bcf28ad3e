"""Mask, photometric calibration, PSF models, visit/detector info and the Exposure constructor."""

from __future__ import annotations

import dataclasses

import galsim
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from apqa.datamodel import (
    DEFAULT_PLANES,
    DetectorInfo,
    Exposure,
    GridPsf,
    Mask,
    MoffatPsf,
    PhotoCalib,
    Psf,
    VisitInfo,
    abmag_to_njy,
    measure_fwhm,
    njy_to_abmag,
)
from apqa.datamodel.psf import TAPER_START
from apqa.errors import InputError

# ---------------------------------------------------------------------------------------------
# Mask


def test_default_planes_in_bit_order():
    mask = Mask.zeros((4, 6))
    assert mask.planes == {name: bit for bit, name in enumerate(DEFAULT_PLANES)}
    assert mask.planes["BAD"] == 0 and mask.planes["SAT"] == 1 and mask.planes["NO_DATA"] == 4
    assert mask.array.dtype == np.int32
    assert mask.shape == (4, 6)
    assert not mask.array.any()


def test_bitmask():
    mask = Mask.zeros((2, 2))
    assert mask.bitmask("BAD") == 1
    assert mask.bitmask("NO_DATA") == 16
    assert mask.bitmask(["BAD", "SAT"]) == 3
    assert mask.bitmask(("SAT", "CR", "EDGE")) == 2 + 4 + 8
    assert mask.bitmask([]) == 0
    assert mask.bitmask(["SAT", "SAT"]) == 2


def test_set_is_set_clear():
    mask = Mask.zeros((4, 4))
    mask.set("SAT", np.eye(4, dtype=bool))
    mask.set("CR", (0, slice(None)))  # an index works as well as a boolean array
    mask.set("CR", (0, 0))  # setting twice is idempotent
    assert mask.is_set("SAT").sum() == 4
    assert mask.is_set("CR").sum() == 4
    assert np.array_equal(mask.is_set("CR")[0], [True] * 4)
    assert mask.array[0, 0] == 2 + 4
    assert mask.is_set(["SAT", "CR"]).sum() == 7  # any of the planes
    assert not mask.is_set("BAD").any()

    mask.clear("SAT")
    assert not mask.is_set("SAT").any()
    assert mask.is_set("CR").sum() == 4  # other planes untouched
    assert np.array_equal(mask.array[0], [4, 4, 4, 4])
    assert not mask.array[1:].any()



@pytest.mark.parametrize("density", [0.0, 1e-3, 0.4, 1.0])
def test_set_and_is_set_on_image_sized_planes_match_plain_bit_arithmetic(density):
    """Sparse and dense selections (two code paths), several blocks of rows and a partial last
    block, bits in the upper half of int32, and a read-only big-endian (memory-mapped) plane."""
    rng = np.random.default_rng(3)
    start = rng.integers(0, 2**30, (601, 173)).astype(np.int32)
    where = rng.random(start.shape) < density
    mask = Mask(start.copy())
    bit = mask.add_plane("WIDE_BIT_PLANE")
    for _ in range(2):  # idempotent
        mask.set("WIDE_BIT_PLANE", where)
    assert np.array_equal(mask.array, start | (where.astype(np.int32) << bit))
    assert np.array_equal(mask.is_set(["SAT", "WIDE_BIT_PLANE"]),
                          (mask.array & ((1 << 1) | (1 << bit))) != 0)
    mapped = mask.array.astype(">i4")
    mapped.flags.writeable = False
    stored = Mask(mapped, mask.planes)
    assert stored.array is mapped
    assert np.array_equal(stored.is_set("WIDE_BIT_PLANE"), mask.is_set("WIDE_BIT_PLANE"))

def test_highest_bit_plane():
    mask = Mask.zeros((3, 3), {"LOW": 0, "TOP": 30})
    mask.set("TOP", (1, 1))
    mask.set("LOW", (1, 1))
    assert mask.array[1, 1] == (1 << 30) + 1
    assert mask.is_set("TOP").sum() == 1
    mask.clear("LOW")
    assert mask.array[1, 1] == 1 << 30
    assert mask.array.dtype == np.int32


@pytest.mark.parametrize("method", ["bitmask", "is_set", "clear"])
def test_unknown_plane_is_an_input_error(method):
    mask = Mask.zeros((2, 2))
    with pytest.raises(InputError, match="unknown plane 'NOT_A_PLANE'") as info:
        getattr(mask, method)("NOT_A_PLANE")
    assert "SAT" in str(info.value)  # the known planes are listed


def test_set_unknown_plane_changes_nothing():
    mask = Mask.zeros((2, 2))
    with pytest.raises(InputError, match="unknown plane 'NOPE'"):
        mask.set("NOPE", np.ones((2, 2), bool))
    with pytest.raises(InputError, match="unknown plane 'NOPE'"):
        mask.is_set(["SAT", "NOPE"])
    assert not mask.array.any()


def test_add_plane():
    mask = Mask.zeros((2, 2))
    bit = mask.add_plane("STREAK_CANDIDATE")
    assert bit == len(DEFAULT_PLANES)
    assert mask.add_plane("STREAK_CANDIDATE") == bit  # existing: not renumbered
    assert mask.add_plane("SAT") == 1
    assert mask.add_plane("ANOTHER") == bit + 1
    mask.set("STREAK_CANDIDATE", (0, 1))
    assert mask.array[0, 1] == 1 << bit


def test_add_plane_beyond_int32_is_refused():
    mask = Mask.zeros((2, 2), {"A": 29})
    assert mask.add_plane("B") == 30
    with pytest.raises(InputError, match="cannot add plane 'C'"):
        mask.add_plane("C")
    assert "C" not in mask.planes


@pytest.mark.parametrize("planes", [{"A": 0, "B": 0}, {"A": 31}, {"A": -1}])
def test_invalid_plane_bits(planes):
    with pytest.raises(InputError, match=r"bits must be unique and in 0\.\.30"):
        Mask.zeros((2, 2), planes)


def test_mask_must_be_2d():
    with pytest.raises(InputError, match="expected a 2-d array"):
        Mask(np.zeros((2, 2, 2)))


def test_mask_header_round_trip():
    mask = Mask.zeros((2, 2))
    mask.add_plane("MY_PLANE")
    mask.add_plane("lower")
    header = fits.Header()
    header["OTHER"] = 5  # unrelated cards are ignored
    mask.to_header(header)
    assert header["MP_SAT"] == 1
    assert header["MP_MY_PLANE"] == 12
    assert Mask.planes_from_header(header) == mask.planes
    # Also through the text form of the header, as in a file.
    parsed = fits.Header.fromstring(header.tostring())
    assert Mask.planes_from_header(parsed) == mask.planes
    assert Mask.planes_from_header(fits.Header()) is None


def test_mask_copy_and_equality():
    mask = Mask.zeros((3, 3))
    mask.set("BAD", (0, 0))
    dup = mask.copy()
    assert dup == mask
    dup.set("SAT", (1, 1))
    dup.add_plane("NEW")
    assert not mask.is_set("SAT").any()
    assert "NEW" not in mask.planes
    assert dup != mask
    assert mask != mask.array  # not a Mask


# ---------------------------------------------------------------------------------------------
# PhotoCalib


@pytest.mark.parametrize("zero_point", [20.0, 27.0, 28.37, 31.4, 33.5])
def test_zero_point_round_trip(zero_point):
    calib = PhotoCalib.from_zero_point(zero_point)
    assert calib.zero_point == pytest.approx(zero_point, abs=1e-12)
    assert calib.calibration_err == 0.0
    assert calib.zero_point_err == 0.0
    # One count has the zero point's magnitude.
    assert calib.to_abmag(1.0) == pytest.approx(zero_point, abs=1e-12)


def test_zero_point_31_4_means_one_njy_per_count():
    assert PhotoCalib.from_zero_point(31.4).calibration_mean == pytest.approx(1.0, rel=1e-14)


def test_to_njy_to_counts_to_abmag():
    calib = PhotoCalib.from_zero_point(27.0)
    counts = np.array([1.0, 10.0, 100.0, 1234.5])
    njy = calib.to_njy(counts)
    assert np.allclose(njy, counts * calib.calibration_mean, rtol=1e-15)
    assert np.allclose(calib.to_counts(njy), counts, rtol=1e-14)
    # 100 counts is 5 mag brighter than 1 count... and 10 counts 2.5 mag.
    mags = calib.to_abmag(counts)
    assert mags[0] == pytest.approx(27.0, abs=1e-12)
    assert mags[1] == pytest.approx(24.5, abs=1e-12)
    assert mags[2] == pytest.approx(22.0, abs=1e-12)
    assert calib.to_njy(2.0) == pytest.approx(2 * calib.calibration_mean)


def test_ab_magnitude_definition():
    # m_AB = 0 is 3631 Jy; 31.4 is the conventional rounding of 2.5 log10(3631e9).
    assert abmag_to_njy(0.0) == pytest.approx(3631e9, rel=1e-4)
    assert njy_to_abmag(3631e9) == pytest.approx(0.0, abs=1e-4)
    assert abmag_to_njy(31.4) == pytest.approx(1.0, rel=1e-14)
    assert njy_to_abmag(1.0) == pytest.approx(31.4, abs=1e-14)
    mags = np.linspace(15.0, 28.0, 14)
    assert np.allclose(njy_to_abmag(abmag_to_njy(mags)), mags, atol=1e-12)
    assert abmag_to_njy(20.0) / abmag_to_njy(25.0) == pytest.approx(100.0, rel=1e-12)


def test_zero_point_error_propagation():
    zp, zp_err = 27.0, 0.05
    calib = PhotoCalib.from_zero_point(zp, zp_err)
    assert calib.zero_point_err == pytest.approx(zp_err, rel=1e-12)
    # d(mean)/d(zp) = -0.4 ln(10) mean, so err(mean) = 0.4 ln(10) mean err(zp): check numerically.
    h = 1e-6
    derivative = (PhotoCalib.from_zero_point(zp + h).calibration_mean
                  - PhotoCalib.from_zero_point(zp - h).calibration_mean) / (2 * h)
    assert calib.calibration_err == pytest.approx(abs(derivative) * zp_err, rel=1e-6)
    assert calib.calibration_err / calib.calibration_mean == pytest.approx(0.04605170, rel=1e-6)
    # And back: an error given in nJy/count gives the matching error in mag.
    direct = PhotoCalib(calib.calibration_mean, calib.calibration_err)
    assert direct.zero_point_err == pytest.approx(zp_err, rel=1e-12)


@pytest.mark.parametrize(("mean", "err"), [(0.0, 0.0), (-1.0, 0.0), (np.nan, 0.0),
                                           (np.inf, 0.0), (1.0, -0.1), (1.0, np.nan)])
def test_invalid_calibration(mean, err):
    with pytest.raises(ValueError, match="calibration_"):
        PhotoCalib(mean, err)


def test_photocalib_is_immutable():
    calib = PhotoCalib(2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        calib.calibration_mean = 3.0  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# MoffatPsf


def _centroid(kernel: np.ndarray) -> tuple[float, float]:
    k = kernel.astype(np.float64)
    half = kernel.shape[0] // 2
    y, x = np.mgrid[: kernel.shape[0], : kernel.shape[1]] - half
    return float((k * x).sum() / k.sum()), float((k * y).sum() / k.sum())


MOFFATS = [
    MoffatPsf(width=2048, height=4096, fwhm_coeffs=[4.0, 0.05]),
    MoffatPsf(width=128, height=64, fwhm_coeffs=[2.6], beta=2.5, trunc=5.0),
    MoffatPsf(width=128, height=64, fwhm_coeffs=[5.0, 0.3, -0.2], g1_coeffs=[0.06],
              g2_coeffs=[-0.04, 0.02], beta=4.0, order=3),
]


@pytest.mark.parametrize("psf", MOFFATS)
@pytest.mark.parametrize(("fx", "fy"), [(0.0, 0.0), (0.5, 0.5), (1.0, 1.0), (0.13, 0.87)])
def test_moffat_kernel_normalized_odd_centred(psf, fx, fy):
    x, y = fx * (psf.width - 1), fy * (psf.height - 1)
    kernel = psf.image_at(x, y)
    assert kernel.dtype == np.float32
    assert kernel.ndim == 2 and kernel.shape[0] == kernel.shape[1]
    assert kernel.shape[0] % 2 == 1
    assert kernel.shape[0] == psf.stamp_size()
    assert float(kernel.sum(dtype=np.float64)) == pytest.approx(1.0, abs=1e-6)
    assert np.all(kernel >= 0)
    cx, cy = _centroid(kernel)
    assert abs(cx) < 1e-6 and abs(cy) < 1e-6
    half = kernel.shape[0] // 2
    assert kernel[half, half] == kernel.max()
    # The truncated profile fits in the stamp: the border is empty.
    assert kernel[0].max() == 0 and kernel[:, 0].max() == 0


def test_moffat_explicit_size():
    psf = MoffatPsf(width=128, height=64)
    kernel = psf.image_at(10.0, 10.0, size=15)
    assert kernel.shape == (15, 15)
    assert float(kernel.sum()) == pytest.approx(1.0, abs=1e-6)


def test_moffat_fwhm_increases_with_coefficient():
    fwhms = [MoffatPsf(width=128, height=64, fwhm_coeffs=[f]).fwhm for f in (3.0, 4.0, 5.0, 6.0)]
    assert all(np.isfinite(fwhms))
    assert fwhms == sorted(fwhms) and len(set(fwhms)) == 4
    # The measured size scales like the model's (to the pixel-response smearing of small PSFs).
    assert fwhms[3] / fwhms[1] == pytest.approx(6.0 / 4.0, rel=0.05)


def test_moffat_fwhm_varies_across_the_detector():
    psf = MoffatPsf(width=2048, height=4096, fwhm_coeffs=[4.0, 0.5, -0.3])
    centre_x, centre_y = (psf.width - 1) / 2, (psf.height - 1) / 2
    assert psf.params_at(centre_x, centre_y)[0] == pytest.approx(4.0)
    assert psf.params_at(psf.width - 1, centre_y)[0] == pytest.approx(4.0 + 0.5, abs=1e-3)
    left, centre, right = (psf.fwhm_at(x, centre_y) for x in (0.0, centre_x, psf.width - 1.0))
    assert left < centre < right
    bottom, top = psf.fwhm_at(centre_x, 0.0), psf.fwhm_at(centre_x, psf.height - 1.0)
    assert bottom > centre > top  # negative v coefficient
    assert psf.fwhm == pytest.approx(centre)


def test_moffat_shear_elongates_along_x_for_positive_g1():
    kernel = MoffatPsf(width=64, height=64, fwhm_coeffs=[4.0], g1_coeffs=[0.1]).image_at(32, 32)
    half = kernel.shape[0] // 2
    y, x = np.mgrid[: kernel.shape[0], : kernel.shape[1]] - half
    ixx, iyy = (kernel * x * x).sum(), (kernel * y * y).sum()
    assert ixx > 1.1 * iyy


@pytest.mark.parametrize(("fwhm", "g1", "g2", "beta", "order", "tolerance"), [
    (4.0, 0.05, -0.03, 3.5, 4, 1e-4),
    (3.0, 0.0, 0.08, 2.5, 4, 1e-4),
    (4.0, 0.0, 0.0, 3.5, 2, 5e-4),
])
def test_moffat_matches_galsim(fwhm, g1, g2, beta, order, tolerance):
    """The pixel-integrated, sheared Moffat is GalSim's, to the quadrature error, inside the
    radius where the smooth truncation taper starts (both normalized over that core)."""
    psf = MoffatPsf(width=64, height=64, fwhm_coeffs=[fwhm], g1_coeffs=[g1], g2_coeffs=[g2],
                    beta=beta, order=order)
    kernel = psf.image_at(31.5, 31.5).astype(np.float64)
    n = kernel.shape[0]
    profile = galsim.Moffat(beta=beta, fwhm=fwhm, trunc=psf.trunc * fwhm).shear(g1=g1, g2=g2)
    reference = profile.drawImage(nx=n, ny=n, scale=1.0, method="auto").array.astype(np.float64)
    y, x = np.mgrid[:n, :n] - n // 2
    core = np.hypot(x, y) < 0.9 * TAPER_START * psf.trunc * fwhm / np.sqrt(1 + abs(g1) + abs(g2))
    kernel, reference = kernel / kernel[core].sum(), reference / reference[core].sum()
    assert np.max(np.abs(kernel - reference)[core]) < tolerance * reference.max()
    # Beyond the truncation radius there is no light at all.
    assert kernel[np.hypot(x, y) > 1.2 * psf.trunc * fwhm].sum() == 0.0


def test_moffat_to_grid():
    psf = MoffatPsf(width=128, height=64, fwhm_coeffs=[4.0, 0.3])
    grid = psf.to_grid(nx=3, ny=2)
    assert grid.images.shape[:2] == (2, 3)
    assert np.array_equal(grid.nodes_x, [0.0, 63.5, 127.0])
    assert np.array_equal(grid.nodes_y, [0.0, 63.0])
    assert np.array_equal(grid.images[1, 2], psf.image_at(127.0, 63.0))
    assert np.allclose(grid.images.sum(axis=(2, 3)), 1.0, atol=1e-6)


def test_models_satisfy_the_psf_protocol():
    assert isinstance(MoffatPsf(width=10, height=10), Psf)
    assert isinstance(GridPsf([0.0], [0.0], np.ones((1, 1, 3, 3))), Psf)


# ---------------------------------------------------------------------------------------------
# GridPsf


def _gaussian(sigma: float, size: int = 21, dx: float = 0.0) -> np.ndarray:
    half = size // 2
    y, x = np.mgrid[:size, :size] - half
    kernel = np.exp(-((x - dx) ** 2 + y**2) / (2 * sigma**2))
    return (kernel / kernel.sum()).astype(np.float32)


@pytest.fixture
def two_node_psf() -> tuple[GridPsf, np.ndarray, np.ndarray]:
    a, b = _gaussian(1.5), _gaussian(3.0, dx=0.7)
    return GridPsf(np.array([10.0, 30.0]), np.array([5.0]), np.stack([[a, b]])), a, b


def test_grid_psf_halfway_is_normalized_average(two_node_psf):
    psf, a, b = two_node_psf
    expected = (a.astype(np.float64) + b) / 2
    expected /= expected.sum()
    mid = psf.image_at(20.0, 5.0)
    assert mid.dtype == np.float32
    assert np.allclose(mid, expected, rtol=0, atol=1e-7)
    assert float(mid.sum(dtype=np.float64)) == pytest.approx(1.0, abs=1e-6)
    # Differs from both nodes, so the comparison is meaningful.
    assert np.abs(mid - a).max() > 1e-3 and np.abs(mid - b).max() > 1e-3
    # The y coordinate does not matter with a single row of nodes.
    assert np.array_equal(psf.image_at(20.0, 500.0), mid)


def test_grid_psf_linear_weights_and_nodes(two_node_psf):
    psf, a, b = two_node_psf
    quarter = psf.image_at(15.0, 5.0)
    assert np.allclose(quarter, 0.75 * a + 0.25 * b, rtol=0, atol=1e-7)
    assert np.allclose(psf.image_at(10.0, 5.0), a, rtol=0, atol=1e-7)
    assert np.allclose(psf.image_at(30.0, 5.0), b, rtol=0, atol=1e-7)
    # Outside the grid the nearest edge kernel is used.
    assert np.array_equal(psf.image_at(-100.0, 5.0), psf.image_at(10.0, 5.0))
    assert np.array_equal(psf.image_at(1e6, 5.0), psf.image_at(30.0, 5.0))


def test_grid_psf_bilinear_centre_of_four_nodes():
    kernels = [_gaussian(s) for s in (1.2, 1.8, 2.4, 3.0)]
    images = np.stack([np.stack(kernels[:2]), np.stack(kernels[2:])])
    psf = GridPsf(np.array([0.0, 100.0]), np.array([0.0, 50.0]), images)
    expected = np.mean(np.stack(kernels).astype(np.float64), axis=0)
    assert np.allclose(psf.image_at(50.0, 25.0), expected / expected.sum(), rtol=0, atol=1e-7)
    # Along an edge only the two kernels of that edge count.
    assert np.allclose(psf.image_at(50.0, 50.0), (kernels[2] + kernels[3]) / 2, atol=1e-7)


def test_grid_psf_normalizes_stored_kernels():
    a, b = 3.0 * _gaussian(1.5), 0.5 * _gaussian(2.5)
    psf = GridPsf(np.array([0.0, 10.0]), np.array([0.0]), np.stack([[a, b]]))
    assert np.allclose(psf.image_at(0.0, 0.0), a / 3.0, rtol=0, atol=1e-7)
    assert np.allclose(psf.image_at(10.0, 0.0), b / 0.5, rtol=0, atol=1e-7)
    assert float(psf.image_at(4.0, 0.0).sum(dtype=np.float64)) == pytest.approx(1.0, abs=1e-6)


def test_grid_psf_fwhm():
    psf = GridPsf(np.array([0.0]), np.array([0.0]), _gaussian(2.0, size=41)[None, None])
    assert psf.fwhm == pytest.approx(2.3548 * 2, rel=0.01)
    assert psf.fwhm_at(1e3, -1e3) == psf.fwhm


@pytest.mark.parametrize("images", [np.ones((1, 2, 4, 4)),  # even kernel
                                    np.ones((1, 2, 5, 3)),  # not square
                                    np.ones((2, 2, 5, 5)),  # wrong number of node rows
                                    np.ones((2, 5, 5))])  # not 4-d
def test_grid_psf_shape_errors(images):
    with pytest.raises(ValueError, match="GridPsf"):
        GridPsf(np.array([0.0, 1.0]), np.array([0.0]), images)


# ---------------------------------------------------------------------------------------------
# measure_fwhm


@pytest.mark.parametrize("sigma", [2.0, 3.0])
def test_measure_fwhm_of_gaussian(sigma):
    kernel = _gaussian(sigma, size=int(12 * sigma) + 1)
    assert measure_fwhm(kernel) == pytest.approx(2.3548 * sigma, rel=0.01)


def test_measure_fwhm_failure_is_nan():
    assert np.isnan(measure_fwhm(np.zeros((21, 21))))
    assert np.isnan(measure_fwhm(-_gaussian(2.0, size=21)))


@pytest.mark.parametrize("fwhm", [2.0, 4.5, 7.0])
@pytest.mark.parametrize("shear", [(0.0, 0.0), (0.1, -0.05)])
def test_measure_fwhm_matches_galsim_hsm(fwhm, shear):
    """The numpy adaptive moments are galsim's FindAdaptiveMom on off-centre, sheared
    Moffat stamps (galsim reports them in float32)."""
    import galsim

    from apqa.datamodel.psf import render_moffat_stamps

    kernel = render_moffat_stamps(np.array([0.3]), np.array([-0.2]), np.array([fwhm]),
                                  np.array([shear[0]]), np.array([shear[1]]), 2.5, 5.0, 41)[0]
    hsm = galsim.ImageD(kernel).FindAdaptiveMom(strict=False)
    assert hsm.moments_status == 0
    assert measure_fwhm(kernel) == pytest.approx(2.3548200450309493 * hsm.moments_sigma,
                                                 rel=2e-6)


# ---------------------------------------------------------------------------------------------
# VisitInfo, DetectorInfo, Exposure constructor


def test_visit_and_detector_info():
    visit = VisitInfo(visit=1, detector=2, band="g", physical_filter="g DECam", mjd=58000.5,
                      exposure_time=30.0)
    assert visit.airmass == 1.0 and np.isnan(visit.seeing) and visit.rotation_angle == 0.0
    assert visit.to_dict()["physical_filter"] == "g DECam"
    assert set(visit.to_dict()) == {f.name for f in dataclasses.fields(VisitInfo)}
    det = DetectorInfo()
    assert (det.gain, det.read_noise, det.saturation, det.name) == (1.0, 0.0, np.inf, "")
    assert DetectorInfo(gain=4.0).to_dict()["gain"] == 4.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        visit.band = "r"  # type: ignore[misc]


def test_exposure_defaults_and_dtypes():
    exp = Exposure(np.arange(8 * 16).reshape(8, 16), np.ones((8, 16), np.float64))
    assert exp.image.dtype == np.float32 and exp.variance.dtype == np.float32
    assert exp.shape == (8, 16) and exp.width == 16 and exp.height == 8
    assert exp.mask == Mask.zeros((8, 16))
    assert exp.image[1, 0] == 16.0
    assert len(exp.metadata) == 0


def test_exposure_constructor_errors():
    with pytest.raises(InputError, match=r"image: expected a 2-d array, got shape \(4,\)"):
        Exposure(np.zeros(4), np.zeros(4))
    with pytest.raises(InputError, match=r"mask: expected shape \(8, 16\).*got \(8, 8\)"):
        Exposure(np.zeros((8, 16)), np.ones((8, 16)), mask=Mask.zeros((8, 8)))
    linear = WCS(naxis=2)
    linear.wcs.ctype = ["LINEAR", "LINEAR"]
    with pytest.raises(InputError, match="expected a celestial WCS"):
        Exposure(np.zeros((8, 16)), np.ones((8, 16)), wcs=linear)
