"""``apqa inject`` and ``apqa inject generate-catalog`` end to end, and their errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from injection.conftest import GAIN, ZERO_POINT, counts_of, make_exposure, make_wcs
from typer.testing import CliRunner

from apqa.cli.app import register_commands
from apqa.datamodel import Exposure, MoffatPsf
from apqa.injection.catalog import read_catalog, write_catalog
from apqa.sim.render import add_point_sources

runner = CliRunner()
app = register_commands()


@pytest.fixture(scope="module")
def calexp(tmp_path_factory):
    path = tmp_path_factory.mktemp("inject") / "calexp.fits"
    make_exposure(512, 768).write_fits(path)
    return path


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_both_commands_with_examples():
    result = _invoke("inject", "--help")
    assert result.exit_code == 0
    assert "generate-catalog" in result.stdout and "Examples" in result.stdout
    assert "--no-noise" in result.stdout
    result = _invoke("inject", "generate-catalog", "--help")
    assert result.exit_code == 0 and "Examples" in result.stdout and "--mix" in result.stdout


def test_generate_then_inject(calexp, tmp_path):
    cat_path = tmp_path / "fakes.parquet"
    result = _invoke("inject", "generate-catalog", "--exposure", calexp, "--out", cat_path,
                     "--n", 40, "--mix", "isolated=0.5,sersic=0.25,negative=0.25",
                     "--mag-min", 19, "--mag-max", 21, "--seed", 3)
    assert result.exit_code == 0, result.output
    assert "40 fakes" in result.stdout
    catalog = read_catalog(cat_path)
    assert catalog["fake_class"].value_counts().to_dict() == {
        "isolated": 20, "sersic": 10, "negative": 10}
    assert catalog["mag"].between(19, 21).all()

    out = tmp_path / "injected.fits"
    result = _invoke("inject", "--exposure", calexp, "--catalog", cat_path, "--out", out,
                     "--no-noise")
    assert result.exit_code == 0, result.output
    assert "30 of 30 science fakes drawn" in result.stdout
    injected = Exposure.from_fits(out)
    drawn = pd.read_parquet(tmp_path / "injected.parquet")
    assert len(drawn) == 30 and (drawn["injection_flag"] == 0).all()
    assert {"x", "y", "injection_flag"} <= set(drawn.columns)
    # Noiseless: the image holds the fakes' counts (but for galaxy wings falling off the
    # edges, 20 px from the nearest fakes); the mask marks them.
    assert injected.image.sum() == pytest.approx(counts_of(drawn["mag"]).sum(), rel=1e-3)
    assert (injected.mask.is_set("INJECTED") == (injected.image != 0)).all()
    assert injected.metadata["INJNUM"] == 30

    # The template gets the negative fakes, with noise, in its own mask plane.
    out_t = tmp_path / "template.fits"
    result = _invoke("inject", "--exposure", calexp, "--catalog", cat_path, "--out", out_t,
                     "--target", "template", "--seed", 2)
    assert result.exit_code == 0, result.output
    template = Exposure.from_fits(out_t)
    assert template.mask.is_set("INJECTED_TEMPLATE").any()
    assert not template.mask.is_set("INJECTED").any()
    assert (template.variance >= make_exposure(512, 768).variance).all()
    assert len(pd.read_parquet(tmp_path / "template.parquet")) == 10


def test_plain_fits_gets_its_psf_estimated(tmp_path):
    rng = np.random.default_rng(5)
    size = 1024
    truth = MoffatPsf(size, size, fwhm_coeffs=[3.6])
    image = np.zeros((size, size), np.float32)
    n_stars = 250
    add_point_sources(image, rng.uniform(20, size - 20, n_stars), rng.uniform(20, size - 20,
                                                                               n_stars),
                      counts_of(rng.uniform(16.5, 20.0, n_stars)), truth)
    electrons = (image + 400.0) * GAIN
    image = (rng.poisson(electrons) / GAIN).astype(np.float32)
    header = make_wcs(size, size).to_header()
    header["MAGZERO"], header["GAIN"], header["EXPTIME"] = ZERO_POINT, GAIN, 30.0
    header["FILTER"] = "g"
    plain = tmp_path / "plain.fits"
    fits.PrimaryHDU(image, header=header).writeto(plain)
    catalog = pd.DataFrame({"injection_id": [1, 2], "kind": "point", "x": [300.4, 700.7],
                            "y": [500.2, 650.9], "mag": [19.0, 19.5]})
    write_catalog(catalog, tmp_path / "c.parquet")
    out = tmp_path / "out.fits"
    result = _invoke("inject", "--exposure", plain, "--catalog", tmp_path / "c.parquet",
                     "--out", out, "--no-noise")
    assert result.exit_code == 0, result.output
    injected = Exposure.from_fits(out)
    assert injected.psf is not None
    assert injected.psf.fwhm == pytest.approx(truth.fwhm, rel=0.03)
    added = injected.image - image  # the original pixels are kept; only the fakes are added
    for x, y, mag in zip(catalog["x"], catalog["y"], catalog["mag"], strict=True):
        box = added[int(y) - 25:int(y) + 26, int(x) - 25:int(x) + 26]
        assert box.sum() == pytest.approx(counts_of(mag), rel=1e-4)


def test_errors_are_one_line(calexp, tmp_path):
    result = _invoke("inject", "--exposure", calexp)
    assert result.exit_code == 2
    assert result.output.strip() == "error: missing option(s) --catalog, --out"
    bad = tmp_path / "bad.parquet"
    write_catalog(pd.DataFrame({"injection_id": [1], "kind": ["blob"], "x": [1.0],
                                "y": [1.0], "mag": [20.0]}), bad)
    result = _invoke("inject", "--exposure", calexp, "--catalog", bad, "--out",
                     tmp_path / "o.fits")
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: {bad}: column 'kind', row 0 (injection_id 1): got 'blob'; expected one of "
        "point, sersic, trail, stamp (1 bad rows)")
    assert not (tmp_path / "o.fits").exists()
    result = _invoke("inject", "generate-catalog", "--exposure", calexp, "--out",
                     tmp_path / "x.parquet", "--mix", "isolated=lots")
    assert result.exit_code == 2
    assert "expected CLASS=FRACTION pairs, got 'isolated=lots'" in result.output
    result = _invoke("inject", "generate-catalog", "--exposure", calexp, "--out",
                     tmp_path / "x.parquet", "--mix", "hosted=1")
    assert result.exit_code == 2 and "hosted fakes need" in result.output
