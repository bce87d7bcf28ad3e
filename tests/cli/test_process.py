"""``apqa process`` end to end on a simulated raw exposure, and its bad-input errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from apqa.cli.app import register_commands
from apqa.datamodel import Exposure, PolynomialPsf

runner = CliRunner()
app = register_commands()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "hits"
    result = runner.invoke(app, ["simulate", "--visits", "1", "--seed", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _args(dataset, out, *extra):
    return ["process", "--exposure", str(dataset / "raw/raw_410001_01.fits"),
            "--bias", str(dataset / "calib/bias_01.fits"),
            "--flat", str(dataset / "calib/flat_g_01.fits"),
            "--defects", str(dataset / "calib/defects_01.parquet"),
            "--out", str(out), *extra]


def test_process_writes_calexp_sources_and_report(dataset, tmp_path):
    out = tmp_path / "proc"
    result = runner.invoke(app, _args(dataset, out, "--refcat", str(dataset / "refcat.parquet")))
    assert result.exit_code == 0, result.output
    assert "zero point" in result.stdout
    calexp = Exposure.from_fits(out / "calexp.fits")
    assert isinstance(calexp.psf, PolynomialPsf)
    assert calexp.wcs.sip is not None and calexp.photo_calib is not None
    sources = pd.read_parquet(out / "sources.parquet")
    for column in ("sourceId", "x", "y", "ra", "dec", "psfFlux", "psfFluxErr", "apFlux",
                   "apFluxErr", "extendedness", "flags_saturated", "flags_cr"):
        assert column in sources
    assert np.isfinite(sources["ra"]).all()
    report = json.loads((out / "process.json").read_text())
    assert report["quality"]["astrometric_scatter_mas"] < 30
    assert set(report["timings"]) == {"isr", "characterize", "calibrate"}
    # Without a refcat the header WCS and nominal calibration are kept.
    out2 = tmp_path / "proc2"
    result = runner.invoke(app, _args(dataset, out2))
    assert result.exit_code == 0, result.output
    plain = Exposure.from_fits(out2 / "calexp.fits")
    raw = Exposure.from_fits(dataset / "raw/raw_410001_01.fits")
    assert plain.photo_calib == raw.photo_calib
    assert np.allclose(plain.wcs.wcs.crval, raw.wcs.wcs.crval)


def test_raw_without_bias_is_one_line_error(dataset, tmp_path):
    result = runner.invoke(app, ["process", "--exposure",
                                 str(dataset / "raw/raw_410001_01.fits"), "--out",
                                 str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "bias" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_bad_refcat_is_one_line_error(dataset, tmp_path):
    bad = tmp_path / "ref.parquet"
    pd.DataFrame({"dec": [1.0, 2.0]}).to_parquet(bad)
    result = runner.invoke(app, _args(dataset, tmp_path / "y", "--refcat", str(bad)))
    assert result.exit_code == 2
    assert str(bad) in result.stderr and "ra" in result.stderr
    assert not (tmp_path / "y").exists()


@pytest.mark.real_data
def test_without_refcat_the_summary_gives_the_headers_zero_point(tmp_path):
    from tests.real_data import require_real_data

    nircam = require_real_data("jwst-nircam")
    image = nircam / "jw02561001002-02561-o001_t003_nircam_clear-f200w_i2d_stamp.fits"
    result = runner.invoke(app, ["process", "--exposure", str(image), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    # MJy/sr and PIXAR_SR: 22.5 nJy per pixel value, zero point 31.4 - 2.5 log10(22.5).
    assert "28.0195 from the image's header" in result.output
    calexp = Exposure.from_fits(tmp_path / "calexp.fits")
    assert calexp.photo_calib.calibration_mean == pytest.approx(22.5)
