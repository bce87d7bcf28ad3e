"""``apqa run`` end to end: a real DECam pair (plain FITS, no MAGZERO) and a synthetic pair with
known transients, the written products, and its bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from typer.testing import CliRunner

from apqa.cli.app import register_commands
from apqa.datamodel import Exposure
from apqa.datamodel.apdb_schema import load_apdb_schema
from tests.pipeline.synthetic_pairs import make_pair
from tests.real_data import require_real_data

runner = CliRunner()
app = register_commands()
# Real DECam cut-outs (sfft's test data, MIT), kept outside the repository in ../shared.


def _plain_fits(exposure: Exposure, path: Path, zero_point: float, visit: int = 2,
                mjd_offset: float = 0.0) -> Path:
    header = exposure.wcs.to_header()
    header["MAGZERO"] = zero_point
    header["FILTER"] = "g"
    header["VISIT"] = visit
    header["MJD-OBS"] = exposure.visit_info.mjd + mjd_offset
    header["EXPTIME"] = 30.0
    fits.PrimaryHDU(exposure.image, header=header).writeto(path)
    return path


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    rng = np.random.default_rng(2)
    pair = make_pair(shape=(768, 768), n_stars=300, transient_flux=tuple(
        10 ** rng.uniform(3.3, 3.8, 20)), vanished_flux=(-4000.0,), seed=12)
    sci = _plain_fits(pair.science, folder / "sci.fits", 28.0)
    tpl = _plain_fits(pair.template, folder / "tpl.fits", 28.0)
    return sci, tpl, pair


def test_run_writes_diasources_difference_and_report(pair_files, tmp_path):
    sci, tpl, pair = pair_files
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "--science", str(sci), "--template", str(tpl),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "DIASources" in result.stdout
    dia = pd.read_parquet(out / "diaSources.parquet")
    assert list(dia.columns) == load_apdb_schema()["DiaSource"].names
    tx, ty, tf = pair.transients.T
    dist = np.hypot(dia["x"].to_numpy()[:, None] - tx, dia["y"].to_numpy()[:, None] - ty)
    assert (dist.min(axis=0) < 2).sum() >= 19  # 21 planted, all bright
    negative = dia.iloc[dist[:, tf < 0].argmin(axis=0)]
    assert negative["isNegative"].all()
    diff = Exposure.from_fits(out / "difference.fits")
    assert diff.psf is not None and diff.photo_calib is not None
    info = json.loads((out / "run.json").read_text())
    assert set(info["timings"]) >= {"prepare", "difference", "detect", "measure", "write"}
    assert info["peak_rss_bytes"] > 1e8
    assert info["quality"]["noise_ratio"] == pytest.approx(1.0, abs=0.05)
    assert info["n_dia_sources"] == len(dia)
    assert info["versions"]["apqa"]


@pytest.mark.real_data
def test_run_on_real_decam_pair(tmp_path):
    decam = require_real_data("decam-mini")
    out = tmp_path / "decam"
    args = ["run", "--science", str(decam / "DEC-OBS04a.mini.fits"),
            "--template", str(decam / "DEC-OBS18a.mini.fits"), "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "MAGZERO" in result.output and "--zero-point" in result.output
    assert not out.exists()
    result = runner.invoke(app, [*args, "--zero-point", "30.0"])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "run.json").read_text())
    # A real pair of the same field: a few DIASources at most, noise as predicted.
    assert info["n_dia_sources"] <= 10
    assert info["quality"]["noise_ratio"] == pytest.approx(1.0, abs=0.06)
    assert info["quality"]["sky_source_pull_std"] == pytest.approx(1.0, abs=0.2)


@pytest.mark.real_data
def test_run_on_real_jwst_stamps_needs_a_one_letter_band(tmp_path):
    nircam = require_real_data("jwst-nircam")
    science, template = (str(nircam / n) for n in (
        "jw02561001002-02561-o001_t003_nircam_clear-f200w_i2d_stamp.fits",
        "jw01324001001-01324-o001_t001_nircam_clear-f200w_i2d_stamp.fits"))
    args = ["run", "--science", science, "--template", template, "--out", str(tmp_path / "o")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "band 'f200w' (from FILTER 'F200W') does not fit" in result.output
    assert "--band" in result.output and not (tmp_path / "o").exists()
    # MJy/sr with PIXAR_SR: calibrated without --zero-point.
    result = runner.invoke(app, [*args, "--band", "K"])
    assert result.exit_code == 0, result.output
    import pandas as pd

    dia = pd.read_parquet(tmp_path / "o" / "diaSources.parquet")
    assert len(dia) > 0 and set(dia["band"]) == {"K"}


def test_run_with_psf_files(pair_files, tmp_path):
    sci, tpl, pair = pair_files
    paths = []
    for name, exposure in (("sci_psf", pair.science), ("tpl_psf", pair.template)):
        paths.append(tmp_path / f"{name}.fits")
        fits.PrimaryHDU(exposure.psf.image_at(383.5, 383.5)).writeto(paths[-1])
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "--science", str(sci), "--template", str(tpl),
                                 "--out", str(out), "--science-psf", str(paths[0]),
                                 "--template-psf", str(paths[1])])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "run.json").read_text())
    assert info["quality"]["noise_ratio"] == pytest.approx(1.0, abs=0.03)
    assert info["n_dia_sources"] >= 15  # of the 20 transients and the vanished source


def test_run_bad_inputs(pair_files, tmp_path):
    sci, tpl, _ = pair_files
    missing = tmp_path / "nope.fits"
    result = runner.invoke(app, ["run", "--science", str(missing), "--template", str(tpl),
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "nope.fits" in result.output
    result = runner.invoke(app, ["run", "--science", str(sci), "--template", str(tpl),
                                 "--out", str(tmp_path / "o"), "--algorithm", "hotpants"])
    assert result.exit_code == 2
    assert "--algorithm 'hotpants'" in result.output
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("detection:\n  threshold: -1\n")
    result = runner.invoke(app, ["run", "--science", str(sci), "--template", str(tpl),
                                 "--out", str(tmp_path / "o"), "--config", str(bad_config)])
    assert result.exit_code == 2
    assert "threshold" in result.output
    assert not (tmp_path / "o").exists()


def test_two_visits_into_one_apdb_build_light_curves_and_alerts(pair_files, tmp_path):
    import fastavro

    sci, tpl, pair = pair_files
    later = _plain_fits(pair.science, tmp_path / "sci3.fits", 28.0, visit=3, mjd_offset=1.0)
    apdb_path = tmp_path / "apdb.sqlite"
    for name, science in (("v2", sci), ("v3", later)):
        result = runner.invoke(app, ["run", "--science", str(science), "--template", str(tpl),
                                     "--out", str(tmp_path / name), "--apdb", str(apdb_path)])
        assert result.exit_code == 0, result.output
    first = json.loads((tmp_path / "v2" / "run.json").read_text())
    second = json.loads((tmp_path / "v3" / "run.json").read_text())
    assert first["association"]["numNewDiaObjects"] == first["n_dia_sources"]
    # The same transients seen again: every DIASource of the second visit updates an object.
    assert second["association"]["numUpdatedDiaObjects"] >= 0.9 * second["n_dia_sources"]
    assert second["association"]["numNewDiaObjects"] <= 0.1 * second["n_dia_sources"]
    assert second["n_forced_sources"] >= 0.9 * second["n_dia_sources"]
    dia = pd.read_parquet(tmp_path / "v3" / "diaSources.parquet")
    assert dia["diaObjectId"].notna().all()
    with open(second["alerts"]["path"], "rb") as handle:
        packets = list(fastavro.reader(handle))
    assert len(packets) == second["alerts"]["count"] == second["n_dia_sources"]
    with_history = [p for p in packets if p["prvDiaSources"]]
    assert len(with_history) >= 0.9 * len(packets)
    assert all(p["cutoutDifference"] for p in packets)
