"""``apqa diff`` from plain FITS as users bring them, and its bad inputs: NaN regions, mismatched
bands, a template without WCS, images that do not overlap, too few stars for a kernel."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from typer.testing import CliRunner

from apqa.cli.app import register_commands
from apqa.datamodel import Exposure
from tests.pipeline.synthetic_pairs import make_pair

runner = CliRunner()
app = register_commands()
APQA = shutil.which("apqa") or str(Path(sys.executable).parent / "apqa")


def _write(exposure: Exposure, path, band="g", image=None, wcs=True, crval_shift=0.0):
    header = exposure.wcs.to_header() if wcs else fits.Header()
    if wcs:
        header["CRVAL1"] += crval_shift
    header["MAGZERO"] = 28.0
    header["FILTER"] = band
    header["MJD-OBS"] = exposure.visit_info.mjd
    data = exposure.image if image is None else image
    fits.PrimaryHDU(data.astype(np.float32), header=header).writeto(path)
    return path


@pytest.fixture(scope="module")
def pair():
    return make_pair(shape=(512, 512), n_stars=200, transient_flux=(5000.0,),
                     vanished_flux=(), seed=21)


def _diff(sci, tpl, out, *extra):
    return runner.invoke(app, ["diff", "--science", str(sci), "--template", str(tpl),
                               "--out", str(out), *extra])


def test_plain_fits_pair_with_a_nan_region(pair, tmp_path):
    image = pair.science.image.copy()
    image[100:160, 300:380] = np.nan  # a chip gap / masked region, as users' images have
    sci = _write(pair.science, tmp_path / "sci.fits", image=image)
    tpl = _write(pair.template, tmp_path / "tpl.fits")
    result = _diff(sci, tpl, tmp_path / "d.fits")
    assert result.exit_code == 0, result.output
    diff = Exposure.from_fits(tmp_path / "d.fits")
    assert np.isfinite(diff.image).all()
    assert diff.mask.is_set("NO_DATA")[100:160, 300:380].all()
    quality = json.loads((tmp_path / "d.fits.json").read_text())
    assert quality["noise_ratio"] == pytest.approx(1.0, abs=0.05)
    assert quality["residual_footprint_ratio"] == pytest.approx(1.0, abs=0.15)
    assert quality["kernel_sum"] == pytest.approx(1.0, abs=0.03)
    assert quality["template_coverage"] == 1.0


def _write_psf(image: np.ndarray, path: Path, extension: str | None = None) -> Path:
    """A PSF file; with ``extension``, as STPSF writes them: an oversampled PSF first (here a
    broad decoy) and the detector-sampled one in that extension."""
    if extension is None:
        fits.PrimaryHDU(image.astype(np.float64)).writeto(path)
    else:
        decoy = np.ones((3 * image.shape[0], 3 * image.shape[1]))
        fits.HDUList([fits.PrimaryHDU(decoy),
                      fits.ImageHDU(image.astype(np.float64), name=extension)]).writeto(path)
    return path


def test_psf_files_replace_the_fitted_models(pair, tmp_path):
    from apqa.datamodel.psf import measure_fwhm

    sci = _write(pair.science, tmp_path / "sci.fits")
    tpl = _write(pair.template, tmp_path / "tpl.fits")
    centre = (255.5, 255.5)
    # Unnormalized on purpose: the reader normalizes.
    sci_psf = _write_psf(3.0 * pair.science.psf.image_at(*centre), tmp_path / "sci_psf.fits",
                         extension="DET_SAMP")
    tpl_psf = _write_psf(pair.template.psf.image_at(*centre), tmp_path / "tpl_psf.fits")
    result = _diff(sci, tpl, tmp_path / "d.fits", "--algorithm", "zogy", "--science-psf",
                   str(sci_psf), "--template-psf", str(tpl_psf))
    assert result.exit_code == 0, result.output
    quality = json.loads((tmp_path / "d.fits.json").read_text())
    assert quality["fwhm_science"] == pytest.approx(
        measure_fwhm(pair.science.psf.image_at(*centre)), rel=1e-4)
    assert quality["fwhm_template"] == pytest.approx(
        measure_fwhm(pair.template.psf.image_at(*centre)), rel=1e-4)
    assert quality["noise_ratio_final"] == pytest.approx(1.0, abs=0.02)

    bad = tmp_path / "even.fits"
    fits.PrimaryHDU(np.ones((20, 20))).writeto(bad)
    result = _diff(sci, tpl, tmp_path / "e.fits", "--science-psf", str(bad))
    assert result.exit_code == 2
    assert "even.fits: PSF image is 20x20; expected an odd-sized square" in result.output
    nan = tmp_path / "nan.fits"
    fits.PrimaryHDU(np.full((21, 21), np.nan)).writeto(nan)
    result = _diff(sci, tpl, tmp_path / "e.fits", "--template-psf", str(nan))
    assert result.exit_code == 2 and "nan.fits: PSF image has non-finite pixels" in result.output
    assert not (tmp_path / "e.fits").exists()


def test_mismatched_bands_warn_but_subtract(pair, tmp_path):
    sci = _write(pair.science, tmp_path / "sci.fits", band="g")
    tpl = _write(pair.template, tmp_path / "tpl.fits", band="r")
    result = _diff(sci, tpl, tmp_path / "d.fits")
    assert result.exit_code == 0, result.output
    assert "science band 'g' differs from template band 'r'" in " ".join(result.output.split())
    assert (tmp_path / "d.fits").exists()


def test_template_without_wcs_is_a_clear_error(pair, tmp_path):
    sci = _write(pair.science, tmp_path / "sci.fits")
    tpl = _write(pair.template, tmp_path / "tpl.fits", wcs=False)
    result = _diff(sci, tpl, tmp_path / "d.fits")
    assert result.exit_code == 2
    assert "tpl.fits" in result.output and "WCS" in result.output
    assert not (tmp_path / "d.fits").exists()


def test_images_that_do_not_overlap(pair, tmp_path):
    sci = _write(pair.science, tmp_path / "sci.fits")
    tpl = _write(pair.template, tmp_path / "tpl.fits", crval_shift=1.0)  # a degree away
    result = _diff(sci, tpl, tmp_path / "d.fits")
    assert result.exit_code == 2
    assert "overlap" in result.output or "coverage" in result.output
    assert not (tmp_path / "d.fits").exists()


def test_too_few_stars_names_the_count(tmp_path):
    sparse = make_pair(shape=(256, 256), n_stars=2, transient_flux=(), vanished_flux=(),
                       seed=2)
    sci = _write(sparse.science, tmp_path / "sci.fits")
    tpl = _write(sparse.template, tmp_path / "tpl.fits")
    result = _diff(sci, tpl, tmp_path / "d.fits")
    assert result.exit_code == 2
    assert "found" in result.output
    assert not (tmp_path / "d.fits").exists()


def test_console_script_keeps_outputs_status_and_messages(pair, tmp_path):
    """As users run it, ``apqa diff`` has its heap faulted in while it imports and skips the
    interpreter's teardown when done: the products are whole, the exit status and the messages
    are those of the command."""
    sci = _write(pair.science, tmp_path / "sci.fits")
    tpl = _write(pair.template, tmp_path / "tpl.fits")
    out = tmp_path / "d.fits"
    ok = subprocess.run([APQA, "diff", "--science", str(sci), "--template", str(tpl),
                         "--out", str(out)], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"{out}: al, noise ratio ")
    assert Exposure.from_fits(out).image.shape == (512, 512)
    assert json.loads((tmp_path / "d.fits.json").read_text())["noise_ratio"] == pytest.approx(
        1.0, abs=0.05)
    no_wcs = _write(pair.template, tmp_path / "no_wcs.fits", wcs=False)
    bad = subprocess.run([APQA, "diff", "--science", str(sci), "--template", str(no_wcs),
                          "--out", str(tmp_path / "bad.fits")], capture_output=True, text=True,
                         check=False)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and "no_wcs.fits" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad.fits").exists()


def test_input_bytes_counts_the_files_read_not_the_outputs(tmp_path):
    from apqa.cli.app import _input_bytes

    (tmp_path / "a.fits").write_bytes(b"x" * 100)
    (tmp_path / "b.fits").write_bytes(b"x" * 10)
    (tmp_path / "d.fits").write_bytes(b"x" * 1000)  # an earlier run's output
    args = ["-q", "diff", "--science", str(tmp_path / "a.fits"),
            f"--template={tmp_path / 'b.fits'}", "--out", str(tmp_path / "d.fits")]
    assert _input_bytes(args) == 110
    assert _input_bytes([f"--out={tmp_path / 'd.fits'}", str(tmp_path / "a.fits")]) == 100


def test_diff_imports_no_pandas_or_scipy_spatial():
    # apqa diff is timed whole: pandas (with pyarrow) and scipy.spatial cost it 0.25 s and
    # 0.09 s of start-up, so the command and everything it runs must do without them.
    code = ("import sys; from apqa.cli.app import main; import apqa.cli.diff; "
            "from apqa.pipeline.diffim import subtract, warp, zogy; "
            "print(sorted(m for m in ('pandas', 'pyarrow', 'scipy.spatial') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_aligned_pair_is_differenced_without_parsing_a_wcs(pair, tmp_path):
    # astropy.wcs (with astropy.coordinates and astropy.table) costs apqa diff 0.13 s to
    # import; aligned images need neither it nor a parsed WCS, and the difference carries
    # the science's WCS cards. Their UTC MJD-OBS goes to TAI without astropy.time either
    # (0.3 s with its IERS tables).
    sci = _write(pair.science, tmp_path / "sci.fits")
    tpl = _write(pair.template, tmp_path / "tpl.fits")
    out = tmp_path / "d.fits"
    code = ("import atexit, sys; from apqa.cli.app import main; "
            "atexit.register(lambda: print([m for m in ('astropy.wcs', 'astropy.time') "
            "if m in sys.modules])); "
            f"sys.argv = ['apqa', 'diff', '--science', {str(sci)!r}, '--template', "
            f"{str(tpl)!r}, '--out', {str(out)!r}]; main()")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"
    written = Exposure.from_fits(out)
    x, y = np.array([0.0, 511.0, 250.3]), np.array([0.0, 511.0, 100.7])
    np.testing.assert_allclose(written.wcs.all_pix2world(x, y, 0),
                               pair.science.wcs.all_pix2world(x, y, 0), rtol=0, atol=1e-10)


@pytest.mark.parametrize("algorithm,crval_shift", [("al", 0.0), ("zogy", 0.0), ("al", 2e-4)])
def test_every_first_import_happens_on_the_main_thread(pair, tmp_path, algorithm, crval_shift):
    # CPython before 3.13 can fail an import that meets another thread's first import of the
    # same package (seen as "KeyError: 'scipy'" in one run of twelve): apqa diff's readers,
    # preparation and tile threads must find every module they use already imported.
    sci = _write(pair.science, tmp_path / "sci.fits")
    tpl = _write(pair.template, tmp_path / "tpl.fits", crval_shift=crval_shift)
    out = tmp_path / "d.fits"
    code = ("import atexit, sys, threading\n"
            "off_main = []\n"
            "class Spy:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if threading.current_thread() is not threading.main_thread():\n"
            "            off_main.append((threading.current_thread().name, name))\n"
            "sys.meta_path.insert(0, Spy())\n"
            "atexit.register(lambda: print(off_main))\n"
            "from apqa.cli.app import main\n"
            f"sys.argv = ['apqa', 'diff', '--science', {str(sci)!r}, '--template', "
            f"{str(tpl)!r}, '--out', {str(out)!r}, '--algorithm', {algorithm!r}]\n"
            "main()\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_grids_that_differ_are_told_from_the_headers(pair, tmp_path):
    # The hint that starts importing the warp's modules early (only the import order
    # depends on it; the subtraction decides from the exposures themselves).
    from apqa.cli.diff import _grids_may_differ

    sci = _write(pair.science, tmp_path / "sci.fits")
    same = _write(pair.template, tmp_path / "same.fits")
    moved = _write(pair.template, tmp_path / "moved.fits", crval_shift=2e-4)
    cropped = _write(pair.template, tmp_path / "cropped.fits",
                     image=pair.template.image[:500])
    assert not _grids_may_differ(sci, same)
    assert _grids_may_differ(sci, moved)
    assert _grids_may_differ(sci, cropped)
    (tmp_path / "junk.fits").write_text("not FITS")
    assert not _grids_may_differ(sci, tmp_path / "junk.fits")


DECAM = "decam-mini"
NIRCAM = "jwst-nircam"
REAL_PAIRS = {
    # Same seeing (~5.2 px), 256 x 256: five stars, none at S/N 20 that ZOGY's fit can use.
    "decam-04a-04b": (DECAM, "DEC-OBS04a.mini.fits", "DEC-OBS04b.mini.fits"),
    "decam-18a-04a": (DECAM, "DEC-OBS18a.mini.fits", "DEC-OBS04a.mini.fits"),
    "nircam": (NIRCAM, "jw02561001002-02561-o001_t003_nircam_clear-f200w_i2d_stamp.fits",
               "jw01324001001-01324-o001_t001_nircam_clear-f200w_i2d_stamp.fits"),
}


@pytest.mark.real_data
@pytest.mark.parametrize("algorithm", ["al", "zogy"])
@pytest.mark.parametrize("name", list(REAL_PAIRS))
def test_real_pairs_subtract_with_the_defaults(name, algorithm, tmp_path):
    from tests.real_data import require_real_data

    folder, science, template = REAL_PAIRS[name]
    data = require_real_data(folder)
    out = tmp_path / "diff.fits"
    result = _diff(data / science, data / template, out, "--algorithm", algorithm)
    assert result.exit_code == 0, result.output
    quality = json.loads(Path(f"{out}.json").read_text())
    # Real inputs carry correlated noise (resampling) the variance planes do not describe:
    # a few percent, not the 2% that simulated pairs meet.
    assert quality["noise_ratio_final"] == pytest.approx(1.0, abs=0.05)
    if algorithm == "al":
        assert quality["condition_number"] < 1e10
    else:
        assert quality["n_flux_ratio_stars"] >= 5
        assert quality["flux_ratio_err"] < 0.03
        assert quality["flux_ratio"] == pytest.approx(1.0, abs=0.1)
    difference = Exposure.from_fits(out)
    assert np.isfinite(difference.image).all()


def _rotated_quarter_turn(path: Path, out: Path) -> Path:
    """The image turned by 90 degrees, pixels and WCS together (CD and CRPIX; the TPV terms act
    after CD and stay): every pixel keeps its sky position, on another grid."""
    with fits.open(path) as hdul:
        header, data = hdul[0].header.copy(), hdul[0].data
    n = data.shape[0]
    turn, offset = np.array([[0.0, -1.0], [1.0, 0.0]]), np.array([n - 1.0, 0.0])
    crpix = np.linalg.solve(turn, np.array([header["CRPIX1"], header["CRPIX2"]]) - 1 - offset)
    cd = np.array([[header["CD1_1"], header["CD1_2"]], [header["CD2_1"], header["CD2_2"]]])
    cd = cd @ turn
    header["CRPIX1"], header["CRPIX2"] = crpix + 1
    header["CD1_1"], header["CD1_2"], header["CD2_1"], header["CD2_2"] = cd.ravel()
    fits.PrimaryHDU(np.rot90(data), header).writeto(out)
    return out


@pytest.mark.real_data
@pytest.mark.parametrize(("algorithm", "tolerance"), [("al", 0.15), ("zogy", 1e-3)])
def test_real_template_on_another_grid_is_warped_back_exactly(algorithm, tolerance, tmp_path):
    # A quarter turn maps pixel centres onto pixel centres, where Lanczos-3 is the identity:
    # the warped template is the original one, distortion (TPV) and all, so the difference
    # is the aligned pair's (AL re-selects its kernel stars on the turned grid: 0.08 sigma).
    from tests.real_data import require_real_data

    decam = require_real_data("decam-mini")
    science, template = decam / "DEC-OBS04a.mini.fits", decam / "DEC-OBS18a.mini.fits"
    turned = _rotated_quarter_turn(template, tmp_path / "turned.fits")
    for name, tpl in (("aligned", template), ("turned", turned)):
        result = _diff(science, tpl, tmp_path / f"{name}.fits", "--algorithm", algorithm)
        assert result.exit_code == 0, result.output
    aligned = Exposure.from_fits(tmp_path / "aligned.fits")
    warped = Exposure.from_fits(tmp_path / "turned.fits")
    assert json.loads(Path(f"{tmp_path / 'turned.fits'}.json").read_text())[
        "template_coverage"] == pytest.approx(1.0)
    good = ~(aligned.mask.is_set(["EDGE", "NO_DATA"]) | warped.mask.is_set(["EDGE", "NO_DATA"]))
    chi = (warped.image - aligned.image)[good] / np.sqrt(aligned.variance[good])
    assert np.sqrt(np.mean(chi**2)) < tolerance
