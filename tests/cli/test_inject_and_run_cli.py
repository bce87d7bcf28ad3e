"""``apqa inject-and-run`` from the command line: a manifest-folder dataset with one corrupt raw
file (only its unit fails, exit code 1), --json output, and bad input (exit code 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import psutil
import psycopg
import pytest
from astropy.io import fits
from typer.testing import CliRunner

from apqa.cli.app import register_commands
from apqa.sim.config import SimulationConfig
from apqa.sim.survey import SurveySimulator

runner = CliRunner()
app = register_commands()
APQA = shutil.which("apqa") or str(Path(sys.executable).parent / "apqa")
PG = "postgresql://postgres@127.0.0.1:5432/test"
CONFIG = """crop: [512, 1024, 1024, 1024]
n_fakes: 60
fake_kinds: [point, negative]
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    sim = SurveySimulator(SimulationConfig(dataset="hits-sim", n_visits=2, seed=3,
                                           spec_overrides={"star_density": 16000}))
    sim.write(root / "field")
    (root / "run.yaml").write_text(CONFIG)
    return root


def test_corrupt_input_fails_only_its_unit(dataset, tmp_path):
    raw = dataset / "field" / "raw" / "raw_410002_01.fits"
    raw.write_bytes(raw.read_bytes()[:5000])  # truncated FITS file
    result = runner.invoke(app, [
        "inject-and-run", "--dataset", str(dataset / "field"), "--config",
        str(dataset / "run.yaml"), "--out", str(tmp_path / "out"), "--db",
        str(tmp_path / "m.db"), "--scheduler", "process", "--json"])
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert summary["n_units"] == 2 and summary["n_failed"] == 1
    assert summary["failed"][0]["visit"] == 410002
    assert "raw_410002_01.fits" in summary["failed"][0]["error"]
    assert summary["metric_run_id"] is not None
    done = json.loads((tmp_path / "out/units/v410001_d01/unit.json").read_text())
    assert done["status"] == "done" and done["n_matched"] > 0
    failed = json.loads((tmp_path / "out/units/v410002_d01/unit.json").read_text())
    assert failed["status"] == "failed"
    assert (tmp_path / "out/units/v410002_d01/error.log").read_text().startswith("Traceback")


@pytest.mark.parametrize(("args", "message"), [
    (["--scheduler", "local:0"], "--scheduler 'local:0': expected 'process', 'local:N'"),
    (["--dataset", "nowhere"], "--dataset nowhere: neither an embedded dataset"),
    (["--fake-kinds", "point,comet"], "fake kinds ['comet']: unknown"),
    (["--algorithm", "hotpants"], "--algorithm 'hotpants': expected 'al' or 'zogy'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = runner.invoke(app, ["inject-and-run", "--out", str(tmp_path / "o"), "--db",
                                 str(tmp_path / "m.db"), *args])
    assert result.exit_code == 2
    assert message in result.stderr
    assert not (tmp_path / "o" / "run.json").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--thresholds", "no/such/thresholds.yaml"], "thresholds file not found"),
    (["--db", "mysql://nowhere/metrics"], "driver 'mysql' is not supported"),
])
def test_bad_input_found_while_the_cluster_starts_closes_it(tmp_path, args, message):
    """The default run (two units) starts its LocalCluster before it checks the thresholds
    and the store URL: a bad one is still one line and exit 2, nothing is written, and the
    worker processes are gone."""
    import multiprocessing

    result = runner.invoke(app, ["inject-and-run", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2
    assert message in result.stderr
    assert not (tmp_path / "o").exists()
    assert multiprocessing.active_children() == []



@pytest.mark.slow
def test_console_script_on_a_cluster_and_postgresql_keeps_its_status_and_stores(dataset,
                                                                                 tmp_path):
    """As users run it: the console script, which leaves without the interpreter's teardown
    once done, on a LocalCluster with its metrics and APDB in PostgreSQL. One corrupt unit
    fails: exit 1, the JSON summary on stdout, the other unit's metrics and DIASources stored
    in PostgreSQL, and no worker process left behind."""
    field = tmp_path / "field"
    shutil.copytree(dataset / "field", field)
    raw = field / "raw" / "raw_410002_01.fits"
    raw.write_bytes(raw.read_bytes()[:5000])
    schema = f"apqa_cli_{uuid.uuid4().hex[:12]}"
    url = f"{PG}?options=-csearch_path%3D{schema}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        # Every process the run starts inherits this mark in its environment.
        mark = uuid.uuid4().hex
        proc = subprocess.run([APQA, "inject-and-run", "--dataset", str(field), "--config",
                               str(dataset / "run.yaml"), "--out", str(tmp_path / "out"),
                               "--db", url, "--apdb", url, "--scheduler", "local:2", "--json"],
                              capture_output=True, text=True, timeout=600, check=False,
                              env={**os.environ, "APQA_TEST_MARK": mark})
        assert proc.returncode == 1, proc.stderr
        summary = json.loads(proc.stdout)
        assert summary["n_units"] == 2 and summary["n_failed"] == 1
        with psycopg.connect(PG) as conn:
            conn.execute(f"SET search_path TO {schema}")
            measurements = conn.execute("SELECT count(*) FROM measurements").fetchone()[0]
            sources = conn.execute('SELECT count(*) FROM "DiaSource"').fetchone()[0]
        assert measurements > 10 and sources > 0
        assert [p.pid for p in psutil.process_iter() if _environ(p).get("APQA_TEST_MARK")
                == mark] == []
    finally:
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def _environ(process: psutil.Process) -> dict:
    try:
        return process.environ()
    except (psutil.Error, OSError):  # gone, or not ours
        return {}


@pytest.mark.real_data
def test_user_dataset_of_real_decam_images(tmp_path):
    """Real cut-outs as users bring them: no visit number (CCDNUM 37), all three with the same
    header date, no MAGZERO. The manifest's visit, detector, mjd and zero point are used, and
    the default number of fakes follows the small area."""
    from tests.real_data import require_real_data

    decam = require_real_data("decam-mini")
    folder = tmp_path / "decam"
    folder.mkdir()
    for name in ("DEC-OBS18a", "DEC-OBS04a", "DEC-OBS04b"):
        shutil.copy(decam / f"{name}.mini.fits", folder)
    # Visit 41 brings its own PSF model (a Moffat of the cut-out's FWHM), used instead of a fit.
    from apqa.datamodel import MoffatPsf

    psf_image = MoffatPsf(256, 256, [5.2]).image_at(127.5, 127.5)
    fits.PrimaryHDU(psf_image.astype(np.float64)).writeto(folder / "psf_04a.fits")
    (folder / "manifest.json").write_text(json.dumps({
        "dataset": "decam-mini", "magzero": 30.0,
        "exposures": [
            {"visit": 18, "detector": 1, "is_template": True, "raw": "DEC-OBS18a.mini.fits"},
            {"visit": 41, "detector": 1, "is_template": False, "mjd": 58334.40,
             "raw": "DEC-OBS04a.mini.fits", "psf": "psf_04a.fits"},
            {"visit": 42, "detector": 1, "is_template": False, "mjd": 58334.41,
             "raw": "DEC-OBS04b.mini.fits"}]}))
    out = tmp_path / "out"
    result = runner.invoke(app, ["inject-and-run", "--dataset", str(folder), "--out", str(out),
                                 "--db", str(tmp_path / "m.db"), "--scheduler", "process",
                                 "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n_units"] == 2 and summary["n_failed"] == 0
    import pandas as pd

    for visit in (41, 42):
        unit = json.loads((out / f"units/v{visit}_d01/unit.json").read_text())
        assert unit["n_fakes"] == 2  # 200 per 2048x4096 pixels, on 256x256
        dia = pd.read_parquet(out / f"units/v{visit}_d01/diaSources.parquet")
        assert set(dia["visit"]) <= {visit} and set(dia["detector"]) <= {1}
    assert (out / "alerts" / "alerts_41_1.avro").is_file()
    from apqa.datamodel import Exposure

    given = Exposure.from_fits(out / "units/v41_d01/science.fits").psf.image_at(10.0, 200.0)
    np.testing.assert_allclose(given, psf_image / psf_image.sum(), atol=1e-7)
    fitted = Exposure.from_fits(out / "units/v42_d01/science.fits").psf.image_at(127.5, 127.5)
    assert fitted.shape != psf_image.shape or np.abs(fitted - given).max() > 1e-4


@pytest.mark.real_data
def test_user_dataset_of_real_jwst_images(tmp_path):
    """Drizzled NIRCam stamps: MJy/sr (calibrated from BUNIT and PIXAR_SR), no GAIN (fakes
    without their own Poisson noise), filter F200W (too long for the APDB's band: the
    manifest names one, and without it the error says so)."""
    from tests.real_data import require_real_data

    nircam = require_real_data("jwst-nircam")
    folder = tmp_path / "nircam"
    folder.mkdir()
    names = sorted(p.name for p in nircam.glob("*.fits"))  # jw01324 (earlier), jw02561
    for name in names:
        shutil.copy(nircam / name, folder)
    manifest = {"dataset": "nircam", "exposures": [
        {"visit": 1, "detector": 1, "is_template": True, "raw": names[0]},
        {"visit": 2, "detector": 1, "is_template": False, "mjd": 59885.58, "raw": names[1]}]}
    args = ["inject-and-run", "--dataset", str(folder), "--db", str(tmp_path / "m.db"),
            "--scheduler", "process", "--json"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert result.exit_code == 1
    error = json.loads(result.stdout)["failed"][0]["error"]
    assert "band 'f200w' (from FILTER 'F200W') does not fit" in error and '"band"' in error

    (folder / "manifest.json").write_text(json.dumps({**manifest, "band": "K"}))
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    unit = json.loads((tmp_path / "b/units/v2_d01/unit.json").read_text())
    assert unit["status"] == "done"
    assert unit["n_fakes"] == round(200 * 900 * 900 / (2048 * 4096))
    assert unit["n_fakes_drawn"] == unit["n_fakes"]
