"""``apqa inspect`` and the bad-input contract: one line naming file and field, exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits
from typer.testing import CliRunner

from apqa.cli.app import register_commands
from apqa.datamodel import Exposure

runner = CliRunner()
app = register_commands()


def _header_with_wcs() -> fits.Header:
    header = fits.Header()
    for key, value in {"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 10.0,
                       "CRVAL2": -5.0, "CRPIX1": 32.0, "CRPIX2": 32.0, "CD1_1": -7.3e-5,
                       "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": 7.3e-5, "GAIN": 2.0,
                       "RDNOISE": 5.0, "MAGZERO": 28.0, "EXPTIME": 30.0, "FILTER": "r",
                       "MJD-OBS": 60000.0}.items():
        header[key] = value
    return header


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_inspect_plain_fits_as_json(tmp_path):
    path = tmp_path / "plain.fits"
    rng = np.random.default_rng(0)
    fits.PrimaryHDU(rng.normal(100, 5, (64, 64)).astype(np.float32),
                    header=_header_with_wcs()).writeto(path)
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["shape"] == [64, 64]
    assert summary["visit_info"]["band"] == "r"
    assert summary["photo_calib"]["zero_point"] == pytest.approx(28.0)
    assert summary["wcs"]["pixel_scale_arcsec"] == pytest.approx(0.2628, rel=1e-3)
    # The variance is measured from the pixels: the sky sigma is 5.
    assert summary["variance_median"] == pytest.approx(25.0, rel=0.1)
    table = runner.invoke(app, ["inspect", str(path)])
    assert table.exit_code == 0 and "visit_info" in table.stdout


def test_inspect_missing_file(tmp_path):
    missing = tmp_path / "nope.fits"
    _one_line_error(runner.invoke(app, ["inspect", str(missing)]), str(missing), "not found")


def test_inspect_fits_without_celestial_wcs(tmp_path):
    path = tmp_path / "nowcs.fits"
    fits.PrimaryHDU(np.ones((16, 16), np.float32)).writeto(path)
    _one_line_error(runner.invoke(app, ["inspect", str(path)]), str(path), "celestial WCS",
                    "CTYPE1")


def test_inspect_nan_only_image(tmp_path):
    path = tmp_path / "nan.fits"
    fits.PrimaryHDU(np.full((16, 16), np.nan, np.float32), header=_header_with_wcs()).writeto(
        path)
    _one_line_error(runner.invoke(app, ["inspect", str(path)]), str(path), "no finite pixels")


def test_inspect_wrong_variance_shape(tmp_path):
    path = tmp_path / "exp.fits"
    Exposure(np.ones((16, 16)), np.ones((16, 16))).write_fits(path)
    with fits.open(path, mode="update") as hdul:
        hdul["VARIANCE"] = fits.ImageHDU(np.ones((8, 16), np.float32), name="VARIANCE")
    _one_line_error(runner.invoke(app, ["inspect", str(path)]), str(path), "VARIANCE",
                    "(16, 16)", "(8, 16)")


def test_inspect_not_fits(tmp_path):
    path = tmp_path / "text.fits"
    path.write_text("hello")
    _one_line_error(runner.invoke(app, ["inspect", str(path)]), str(path), "FITS")
