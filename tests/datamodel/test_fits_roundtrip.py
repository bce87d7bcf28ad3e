"""Round trip of the apqa multi-extension FITS format: write_fits -> Exposure.from_fits."""

from __future__ import annotations

import hashlib
import os
import stat

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from apqa.datamodel import DetectorInfo, Exposure, GridPsf, Mask, MoffatPsf, VisitInfo
from apqa.datamodel.fits_io import FORMAT_VERSION, _write_hdus
from apqa.errors import InputError

# ---------------------------------------------------------------------------------------------
# pixels, mask, descriptions


@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<i4", "<i2", "<f8", "u1", "<u2"])
def test_block_writer_writes_the_bytes_astropy_writes(tmp_path, dtype):
    """The block-wise writer's file is byte for byte astropy's own, for planes of several
    blocks of rows (600 rows), a cube and a big-endian input; the arrays are left as they
    were, and the digest it feeds as it writes is the file's sha256. Unsigned 16-bit planes
    (stored with BZERO) go through astropy."""
    rng = np.random.default_rng(0)
    plane = (rng.normal(0, 1000, (600, 37))).astype(dtype)
    cube = rng.normal(size=(3, 5, 5))
    header = fits.Header()
    header["OBJECT"] = ("field", "a comment")
    # No EXTEND card: the HDU list adds it, as it must for a file with extensions.
    hdus = [fits.PrimaryHDU(header=header), fits.ImageHDU(plane, name="PLANE"),
            fits.ImageHDU(cube, name="CUBE")]
    before = plane.copy()
    digest = hashlib.sha256()
    _write_hdus(fits.HDUList(hdus), str(tmp_path / "ours.fits"), digest)
    fits.HDUList([h.copy() for h in hdus]).writeto(tmp_path / "astropy.fits")
    assert (tmp_path / "ours.fits").read_bytes() == (tmp_path / "astropy.fits").read_bytes()
    assert digest.hexdigest() == hashlib.sha256((tmp_path / "ours.fits").read_bytes()
                                                ).hexdigest()
    assert np.array_equal(plane, before) and plane.dtype == np.dtype(dtype)
    with fits.open(tmp_path / "ours.fits") as back:
        assert back[0].header["EXTEND"] is True
        assert np.array_equal(back["PLANE"].data, plane)


def test_pixels_bit_exact_with_dtypes(make_exposure, tmp_path):
    exp = make_exposure()
    path = exp.write_fits(tmp_path / "exp.fits")
    back = Exposure.from_fits(path)

    assert back.shape == exp.shape == (64, 128)
    assert back.image.dtype == np.float32
    assert back.variance.dtype == np.float32
    assert back.mask.array.dtype == np.int32
    assert np.array_equal(back.image, exp.image)
    assert np.array_equal(back.variance, exp.variance)
    assert np.array_equal(back.mask.array, exp.mask.array)
    # The fixture really sets several planes, so the mask comparison is not one of zeros.
    assert back.mask.is_set("SAT").sum() == 1
    assert back.mask.is_set("EDGE").sum() == 64 * 3
    assert back.mask.is_set("MY_CUSTOM").any()


def test_lazy_read_maps_the_stored_planes_read_only(make_exposure, tmp_path):
    exp = make_exposure()
    path = exp.write_fits(tmp_path / "exp.fits")
    lazy = Exposure.from_fits(path, lazy=True)
    # The planes are the file's big-endian pixels, not converted copies, and cannot be changed.
    assert lazy.image.dtype == np.dtype(">f4") and lazy.mask.array.dtype == np.dtype(">i4")
    assert not lazy.image.flags.writeable and not lazy.variance.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        lazy.image[0, 0] = 1.0
    assert np.array_equal(lazy.image, exp.image)
    assert np.array_equal(lazy.variance, exp.variance, equal_nan=True)
    assert np.array_equal(lazy.mask.is_set("SAT"), exp.mask.is_set("SAT"))
    assert lazy.wcs.to_header() == exp.wcs.to_header()
    # A copy (or any array the pipeline makes) is native and writeable again.
    assert Exposure(np.array(lazy.image), lazy.variance).image.flags.writeable


def test_nonfinite_variance_survives(make_exposure, tmp_path):
    exp = make_exposure()
    exp.variance[0, 0] = np.inf
    back = Exposure.from_fits(exp.write_fits(tmp_path / "exp.fits"))
    assert np.isposinf(back.variance[0, 0])
    assert np.array_equal(back.variance, exp.variance)


def test_mask_plane_map_preserved_including_custom_plane(make_exposure, tmp_path):
    exp = make_exposure()
    exp.mask.add_plane("lower_case_plane")  # HIERARCH cards keep the case
    back = Exposure.from_fits(exp.write_fits(tmp_path / "exp.fits"))

    assert back.mask.planes == exp.mask.planes
    assert back.mask.planes["MY_CUSTOM"] == 12
    assert back.mask.planes["lower_case_plane"] == 13
    assert back.mask == exp.mask
    assert np.array_equal(back.mask.is_set("MY_CUSTOM"), exp.mask.is_set("MY_CUSTOM"))


def test_nondefault_plane_numbering_preserved(make_exposure, tmp_path):
    planes = {"SAT": 5, "NO_DATA": 0, "CUSTOM": 30}
    mask = Mask.zeros((64, 128), planes)
    mask.set("CUSTOM", (slice(0, 2), slice(None)))
    mask.set("SAT", (5, 6))
    back = Exposure.from_fits(make_exposure(mask=mask).write_fits(tmp_path / "exp.fits"))
    assert back.mask.planes == planes
    assert back.mask.array[0, 0] == 1 << 30
    assert back.mask.array[5, 6] == 1 << 5
    assert back.mask == mask


def test_visit_detector_photocalib_preserved(make_exposure, tmp_path):
    exp = make_exposure()
    back = Exposure.from_fits(exp.write_fits(tmp_path / "exp.fits"))

    assert back.visit_info == exp.visit_info
    assert back.visit_info.mjd == 58123.456789012345  # full double precision, not 16 digits
    assert back.detector_info == exp.detector_info
    assert back.photo_calib == exp.photo_calib
    assert back.photo_calib.zero_point == pytest.approx(exp.photo_calib.zero_point, abs=1e-12)


def test_visit_info_with_nonfinite_values_round_trips(make_exposure, tmp_path):
    """NaN fields (unknown date, airmass...) are not written as cards but must survive."""
    visit = VisitInfo(visit=1, detector=2, band="r", physical_filter="r", mjd=float("nan"),
                      exposure_time=30.0, airmass=float("nan"))
    back = Exposure.from_fits(
        make_exposure(visit_info=visit).write_fits(tmp_path / "exp.fits"))
    assert back.visit_info.visit == 1
    assert np.isnan(back.visit_info.mjd)
    assert np.isnan(back.visit_info.airmass)  # not the 1.0 default
    assert np.isnan(back.visit_info.seeing)
    assert back.visit_info.exposure_time == 30.0


def test_detector_info_with_unknown_gain_round_trips(make_exposure, tmp_path):
    """A plain image without GAIN/RDNOISE gives NaN values, which FITS headers cannot hold."""
    det = DetectorInfo(gain=float("nan"), read_noise=float("nan"))
    back = Exposure.from_fits(make_exposure(detector_info=det).write_fits(tmp_path / "e.fits"))
    assert back.detector_info is not None
    assert np.isnan(back.detector_info.gain)
    assert np.isnan(back.detector_info.read_noise)
    assert np.isposinf(back.detector_info.saturation)


def test_optional_descriptions_absent(tmp_path, simple_wcs):
    exp = Exposure(np.ones((64, 128)), np.ones((64, 128)), wcs=simple_wcs)
    back = Exposure.from_fits(exp.write_fits(tmp_path / "bare.fits"))
    assert back.psf is None
    assert back.photo_calib is None
    assert back.visit_info is None
    assert back.detector_info is None
    assert back.mask == Mask.zeros((64, 128))


def test_metadata_cards_carried_through(make_exposure, tmp_path):
    exp = make_exposure()
    exp.metadata["OBSERVER"] = ("A. Person", "who observed")
    exp.metadata["SKYLEVEL"] = 123.5
    exp.metadata["GAIN"] = 99.0  # reserved: the detector info wins
    exp.metadata.add_history("step one")
    exp.metadata.add_history("step two")
    back = Exposure.from_fits(exp.write_fits(tmp_path / "exp.fits"))
    assert back.metadata["OBSERVER"] == "A. Person"
    assert back.metadata.comments["OBSERVER"] == "who observed"
    assert back.metadata["SKYLEVEL"] == 123.5
    assert "GAIN" not in back.metadata
    assert back.detector_info.gain == 3.98
    assert [str(h) for h in back.metadata["HISTORY"]] == ["step one", "step two"]


def test_write_is_atomic_and_respects_overwrite(make_exposure, tmp_path):
    exp = make_exposure()
    path = exp.write_fits(tmp_path / "sub" / "exp.fits")
    assert path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["exp.fits"]  # no temp file left
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644

    with pytest.raises(InputError, match="file exists") as info:
        exp.write_fits(path, overwrite=False)
    assert str(path) in str(info.value)

    exp.image[0, 0] = -5.0
    exp.write_fits(path)  # overwrite=True is the default
    assert Exposure.from_fits(path).image[0, 0] == -5.0


def test_copy_is_deep(make_exposure):
    exp = make_exposure()
    dup = exp.copy()
    dup.image[0, 0] += 1
    dup.mask.set("BAD", (0, 0))
    dup.mask.add_plane("ONLY_IN_COPY")
    assert exp.image[0, 0] != dup.image[0, 0]
    assert not exp.mask.is_set("BAD")[0, 0]
    assert "ONLY_IN_COPY" not in exp.mask.planes


# ---------------------------------------------------------------------------------------------
# WCS


def _pixel_grid(width: int = 2048, height: int = 4096, n: int = 9):
    xs = np.linspace(-0.5, width - 0.5, n)
    ys = np.linspace(-0.5, height - 0.5, 2 * n - 1)
    x, y = np.meshgrid(xs, ys)
    return x.ravel(), y.ravel()


def test_tan_sip_wcs_round_trip(decam_wcs, tmp_path):
    assert decam_wcs.sip is not None
    assert decam_wcs.wcs.ctype[0] == "RA---TAN-SIP"
    exp = Exposure(np.zeros((64, 128)), np.ones((64, 128)), wcs=decam_wcs)
    back = Exposure.from_fits(exp.write_fits(tmp_path / "wcs.fits"))
    assert back.wcs is not None and back.wcs.sip is not None
    assert back.wcs.wcs.ctype[0] == "RA---TAN-SIP"

    # The grid covers the whole 2048 x 4096 detector the WCS describes (the SIP terms matter at
    # the edges), although the stored image is small.
    x, y = _pixel_grid()
    ra, dec = decam_wcs.all_pix2world(x, y, 0)
    x2, y2 = back.wcs.all_world2pix(ra, dec, 0, tolerance=1e-10, maxiter=100)
    assert np.max(np.abs(x2 - x)) < 1e-6
    assert np.max(np.abs(y2 - y)) < 1e-6

    # Distortion really is present: ignoring SIP moves corner pixels by far more than that.
    ra_lin, dec_lin = decam_wcs.wcs_pix2world(x, y, 0)
    assert np.max(np.hypot((ra_lin - ra) * np.cos(np.deg2rad(dec)), dec_lin - dec)) * 3600 > 0.01

    # Sky positions directly: 1e-6 px at 0.263"/px is 2.6e-7 arcsec.
    ra2, dec2 = back.wcs.all_pix2world(x, y, 0)
    sep_arcsec = np.hypot((ra2 - ra) * np.cos(np.deg2rad(dec)), dec2 - dec) * 3600
    assert np.max(sep_arcsec) < 1e-6 * 0.263

    # The Exposure helpers use the same transformation.
    ra3, dec3 = back.pixel_to_sky(x, y)
    assert np.allclose(ra3, ra, rtol=0, atol=1e-10)
    assert np.allclose(dec3, dec, rtol=0, atol=1e-10)
    x4, y4 = back.sky_to_pixel(ra, dec)
    assert np.max(np.hypot(x4 - x, y4 - y)) < 1e-5


def test_exposure_without_wcs_needs_require_wcs_false(tmp_path):
    exp = Exposure(np.ones((64, 128)), np.ones((64, 128)))
    path = exp.write_fits(tmp_path / "nowcs.fits")
    with pytest.raises(InputError, match="no celestial WCS") as info:
        Exposure.from_fits(path)
    assert str(path) in str(info.value)
    back = Exposure.from_fits(path, require_wcs=False)
    assert back.wcs is None
    assert np.array_equal(back.image, exp.image)
    with pytest.raises(InputError, match="no WCS"):
        back.pixel_to_sky(np.array([0.0]), np.array([0.0]))
    with pytest.raises(InputError, match="no WCS"):
        back.sky_to_pixel(np.array([0.0]), np.array([0.0]))


# ---------------------------------------------------------------------------------------------
# PSF


def test_moffat_psf_round_trip(make_exposure, tmp_path):
    psf = MoffatPsf(width=128, height=64, fwhm_coeffs=[3.5, 0.2, -0.1, 0.05, 0.02, 0.01],
                    g1_coeffs=[0.02, 0.01], g2_coeffs=[-0.01, 0.0, 0.015], beta=2.9,
                    trunc=3.5, order=3)
    back = Exposure.from_fits(make_exposure(psf=psf).write_fits(tmp_path / "moffat.fits"))
    assert isinstance(back.psf, MoffatPsf)
    assert back.psf == psf  # every parameter, coefficient lists included
    for x, y in [(0.0, 0.0), (63.5, 31.5), (127.0, 63.0), (10.25, 50.75)]:
        assert np.array_equal(back.psf.image_at(x, y), psf.image_at(x, y))


def test_grid_psf_round_trip(make_exposure, rng, tmp_path):
    images = rng.random((3, 4, 11, 11)).astype(np.float32)
    psf = GridPsf(np.array([0.0, 40.0, 85.5, 127.0]), np.array([0.0, 31.0, 63.0]), images)
    back = Exposure.from_fits(make_exposure(psf=psf).write_fits(tmp_path / "grid.fits"))
    assert isinstance(back.psf, GridPsf)
    assert back.psf.images.dtype == np.float32
    assert np.array_equal(back.psf.images, psf.images)
    assert np.array_equal(back.psf.nodes_x, psf.nodes_x)
    assert np.array_equal(back.psf.nodes_y, psf.nodes_y)
    for x, y in [(0.0, 0.0), (20.0, 15.5), (100.0, 50.0), (127.0, 63.0), (500.0, -3.0)]:
        assert np.array_equal(back.psf.image_at(x, y), psf.image_at(x, y))


def test_malformed_psf_extension(make_exposure, rng, tmp_path):
    psf = GridPsf(np.array([0.0, 127.0]), np.array([0.0]), rng.random((1, 2, 5, 5)))
    path = make_exposure(psf=psf).write_fits(tmp_path / "grid.fits")
    with fits.open(path, mode="update") as hdul:
        del hdul["PSF"].header["PSFX1"]
    with pytest.raises(InputError, match="malformed PSF extension") as info:
        Exposure.from_fits(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------
# what other readers see


def test_file_opens_with_plain_astropy(make_exposure, decam_wcs, tmp_path):
    psf = MoffatPsf(width=128, height=64, fwhm_coeffs=[3.0])
    path = make_exposure(psf=psf, wcs=decam_wcs).write_fits(tmp_path / "exp.fits")
    with fits.open(path) as hdul:
        names = [h.name for h in hdul]
        assert names == ["PRIMARY", "IMAGE", "MASK", "VARIANCE", "PSF"]
        assert hdul[0].header["APQAFMT"] == FORMAT_VERSION
        assert hdul[0].header["HASPSF"] is True
        assert hdul["IMAGE"].data.shape == (64, 128)
        assert hdul["IMAGE"].header["BITPIX"] == -32
        assert hdul["VARIANCE"].header["BITPIX"] == -32
        assert hdul["MASK"].header["BITPIX"] == 32

        image_wcs = WCS(hdul["IMAGE"].header)
        assert image_wcs.has_celestial
        assert image_wcs.wcs.ctype[0] == "RA---TAN-SIP"
        ra, dec = image_wcs.all_pix2world([10.0], [20.0], 0)
        ra0, dec0 = decam_wcs.all_pix2world([10.0], [20.0], 0)
        assert ra[0] == pytest.approx(ra0[0], abs=1e-10)
        assert dec[0] == pytest.approx(dec0[0], abs=1e-10)

        mask_header = hdul["MASK"].header
        mp = {k: v for k, v in mask_header.items() if k.startswith("MP_")}
        assert mp["MP_BAD"] == 0
        assert mp["MP_SAT"] == 1
        assert mp["MP_MY_CUSTOM"] == 12
        assert len(mp) == 13

        # The PSF cube is readable as plain kernels on a grid.
        cube = hdul["PSF"].data
        h = hdul["PSF"].header
        assert h["PSFTYPE"] == "MOFFAT"
        assert cube.shape[0] == h["PSFNX"] * h["PSFNY"]
        assert cube.shape[1] == cube.shape[2] and cube.shape[1] % 2 == 1
        assert np.allclose(cube.sum(axis=(1, 2)), 1.0, atol=1e-5)


def test_missing_extension_is_reported(make_exposure, tmp_path):
    path = make_exposure().write_fits(tmp_path / "exp.fits")
    with fits.open(path) as hdul:
        fits.HDUList([hdul[0], hdul["IMAGE"], hdul["VARIANCE"]]).writeto(
            tmp_path / "nomask.fits")
    with pytest.raises(InputError, match="lacks the 'MASK' HDU") as info:
        Exposure.from_fits(tmp_path / "nomask.fits")
    assert "nomask.fits" in str(info.value)


def test_newer_format_version_is_refused(make_exposure, tmp_path):
    path = make_exposure().write_fits(tmp_path / "exp.fits")
    with fits.open(path, mode="update") as hdul:
        hdul[0].header["APQAFMT"] = FORMAT_VERSION + 1
    with pytest.raises(InputError, match="newer than this apqa reads") as info:
        Exposure.from_fits(path)
    assert str(path) in str(info.value)


def test_polynomial_psf_round_trip(tmp_path):
    import numpy as np

    from apqa.datamodel import Exposure, PolynomialPsf

    rng = np.random.default_rng(3)
    coeffs = rng.normal(0, 0.01, (6, 11, 11))
    coeffs[0, 5, 5] += 1.0
    psf = PolynomialPsf(64, 128, coeffs, order=2)
    exposure = Exposure(np.zeros((128, 64)), np.ones((128, 64)), psf=psf)
    path = tmp_path / "poly.fits"
    exposure.write_fits(path)
    back = Exposure.from_fits(path, require_wcs=False).psf
    assert isinstance(back, PolynomialPsf) and back.order == 2
    assert np.array_equal(back.coefficients, psf.coefficients)
    for x, y in ((0.0, 0.0), (31.5, 90.0), (63.0, 127.0)):
        assert np.array_equal(back.image_at(x, y), psf.image_at(x, y))


def test_direct_reads_and_writes_round_trip(tmp_path):
    """Files written past the page cache read back the same, mapped or read whole with direct
    I/O (big-endian, read-only planes), and a file whose length is not a multiple of the
    4096-byte block keeps its exact length."""
    from apqa.datamodel.direct_io import read_direct

    rng = np.random.default_rng(5)
    image = rng.normal(0, 1, (333, 517)).astype(np.float32)
    exposure = Exposure(image=image, variance=np.abs(image) + 1)
    exposure.mask.add_plane("DETECTED")
    exposure.mask.set("DETECTED", image > 1)
    path = tmp_path / "odd.fits"
    exposure.write_fits(path)
    assert path.stat().st_size % 2880 == 0 and path.stat().st_size % 4096 != 0
    assert read_direct(path).tobytes() == path.read_bytes()
    mapped = Exposure.from_fits(path, require_wcs=False, lazy=True)
    whole = Exposure.from_fits(path, require_wcs=False, lazy=True, direct=True)
    for got in (mapped, whole):
        np.testing.assert_array_equal(got.image, image)
        np.testing.assert_array_equal(got.variance, exposure.variance)
        np.testing.assert_array_equal(got.mask.array, exposure.mask.array)
    assert not whole.image.flags.writeable and whole.image.dtype == np.dtype(">f4")


def test_buffered_fallback_writes_the_same_bytes(tmp_path, monkeypatch):
    """Where O_DIRECT is missing or refused, the writer falls back to ordinary writes."""
    from apqa.datamodel import direct_io

    image = np.random.default_rng(6).normal(0, 1, (200, 300)).astype(np.float32)
    exposure = Exposure(image=image, variance=np.ones_like(image))
    exposure.write_fits(tmp_path / "direct.fits")
    monkeypatch.setattr(direct_io, "_O_DIRECT", 0)
    with direct_io.StreamWriter(tmp_path / "probe.bin") as probe:
        assert not probe.direct
    exposure.write_fits(tmp_path / "buffered.fits")
    assert (tmp_path / "buffered.fits").read_bytes() == (tmp_path / "direct.fits").read_bytes()
    assert direct_io.read_direct(tmp_path / "buffered.fits").tobytes() == (
        tmp_path / "direct.fits").read_bytes()


def test_direct_writes_refused_mid_file_go_on_buffered(tmp_path, monkeypatch):
    """A device with blocks larger than 4096 bytes refuses direct writes with EINVAL: the
    writer switches to buffered writes and the file comes out the same."""
    import errno
    import fcntl

    from apqa.datamodel import direct_io

    image = np.random.default_rng(7).normal(0, 1, (1500, 1500)).astype(np.float32)
    exposure = Exposure(image=image, variance=np.ones_like(image))
    exposure.write_fits(tmp_path / "reference.fits")
    real_write = os.write
    refused = []

    def picky_write(fd, data):
        if direct_io._O_DIRECT and fcntl.fcntl(fd, fcntl.F_GETFL) & direct_io._O_DIRECT:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(direct_io.os, "write", picky_write)
    exposure.write_fits(tmp_path / "fallback.fits")
    assert (tmp_path / "fallback.fits").read_bytes() == (tmp_path / "reference.fits").read_bytes()
    if direct_io._O_DIRECT and refused:  # where direct I/O was on at all
        assert len(refused) == 1


def test_direct_io_probe_leaves_nothing_behind(tmp_path):
    from apqa.datamodel.direct_io import StreamWriter, writes_direct

    # The probe says what the writer then does (direct on ext4 and xfs, buffered on tmpfs),
    # and leaves no file; a directory that does not exist cannot be written at all.
    probed = writes_direct(tmp_path)
    assert list(tmp_path.iterdir()) == []
    with StreamWriter(tmp_path / "x.bin") as writer:
        assert writer.direct == probed
    assert writes_direct(tmp_path / "missing") is False
