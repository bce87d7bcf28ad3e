"""The command line, through Typer's runner and as a real subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from apqa import __version__
from apqa.cli.app import prose, register_commands
from apqa.datamodel import Exposure

runner = CliRunner()
app = register_commands()
APQA = shutil.which("apqa") or str(Path(sys.executable).parent / "apqa")


def test_version_and_help():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"apqa {__version__}"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "Examples" in result.stdout and "apqa simulate" in result.stdout
    result = runner.invoke(app, ["simulate", "--help"])
    assert result.exit_code == 0
    assert "Examples" in result.stdout and "--dataset" in result.stdout


def _entry_point_then(args: list[str], report: str, env: dict[str, str] | None = None
                      ) -> tuple[str, object]:
    """Run the ``apqa`` entry point with ``args`` in a fresh interpreter, then the expression
    ``report`` there: what the command printed and the expression's value (through JSON)."""
    probe = (f"import json, sys; sys.argv = ['apqa', *{args!r}]\n"
             "from apqa.cli.app import main\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             f"print(json.dumps({report}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=env, check=True).stdout
    printed, _, value = out.rstrip().rpartition("\n")
    return printed, json.loads(value)


def _modules_after(*args: str) -> tuple[str, set[str]]:
    """What the entry point printed with ``args`` and the modules it had imported by then."""
    printed, modules = _entry_point_then(list(args), "sorted(sys.modules)")
    return printed, set(modules)


def test_help_imports_no_science_stack():
    """``apqa --help`` loads every command module: none may import numpy, pandas, astropy,
    scipy, galsim or the simulator at module level (they took 1.4 s of every help)."""
    printed, modules = _modules_after("--help")
    assert "Usage" in printed and "inject-and-run" in printed
    heavy = {"numpy", "pandas", "astropy", "scipy", "galsim"}
    assert sorted(m for m in modules if m.split(".")[0] in heavy or m == "apqa.sim") == []


def test_prose_joins_paragraph_lines_and_keeps_examples():
    text = "Examples:\n\n  apqa diff --out d.fits\n  --score s.fits\n\nOutputs go\nto OUT.\n"
    assert prose(text) == ("Examples:\n\n  apqa diff --out d.fits\n  --score s.fits\n\n"
                           "Outputs go to OUT.")


def test_help_paragraphs_wrap_at_the_terminal_width():
    # Source line breaks inside a paragraph would show as ragged lines on a wide terminal.
    result = CliRunner().invoke(app, ["inject-and-run", "--help"], env={"COLUMNS": "300"},
                                terminal_width=300)
    assert result.exit_code == 0
    line = next(t for t in result.stdout.splitlines() if "--dataset is an embedded" in t)
    assert "or a folder with a manifest.json" in line  # broken after "or a" in the source


def test_simulate_writes_dataset(tmp_path):
    out = tmp_path / "sim"
    result = runner.invoke(app, ["simulate", "--dataset", "hits-sim", "--visits", "1",
                                 "--seed", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "hits-sim" and manifest["seed"] == 4
    assert manifest["template_visits"] == [400001] and manifest["science_visits"] == [410001]
    assert len(manifest["exposures"]) == 2
    for entry in manifest["exposures"]:
        for key in ("raw", "bias", "flat", "defects"):
            assert (out / entry[key]).is_file()
    raw = Exposure.from_fits(out / manifest["exposures"][1]["raw"])
    assert raw.shape == (4096, 2048)
    assert raw.visit_info.visit == 410001 and raw.visit_info.band == "g"
    assert raw.wcs.has_celestial and raw.detector_info.gain == 4.0
    for table in manifest["truth"].values():
        assert (out / table).is_file()
    assert (out / manifest["refcat"]).is_file()
    # No temporary folders are left next to the output.
    assert [p.name for p in tmp_path.iterdir()] == ["sim"]


def _assert_one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]


def test_unknown_dataset_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "nothing"
    result = runner.invoke(app, ["simulate", "--dataset", "nope-sim", "--out", str(out)])
    _assert_one_line_error(result, "nope-sim", "hits-sim")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_unknown_config_key_is_one_line(tmp_path):
    config = tmp_path / "sim.yaml"
    config.write_text("dataset: cosmos-sim\nn_visit: 3\n")
    result = runner.invoke(app, ["simulate", "--config", str(config), "--out",
                                 str(tmp_path / "x")])
    _assert_one_line_error(result, str(config), "n_visit")
    assert not (tmp_path / "x").exists()


def test_bad_config_value_and_missing_config(tmp_path):
    config = tmp_path / "sim.yaml"
    config.write_text("n_visits: -2\n")
    result = runner.invoke(app, ["simulate", "--config", str(config), "--out",
                                 str(tmp_path / "x")])
    _assert_one_line_error(result, "n_visits")
    result = runner.invoke(app, ["simulate", "--config", str(tmp_path / "missing.yaml"),
                                 "--out", str(tmp_path / "x")])
    _assert_one_line_error(result, "missing.yaml", "not found")


def test_existing_output_is_not_clobbered(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["simulate", "--out", str(out)])
    _assert_one_line_error(result, str(out), "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_config_file_is_used_and_options_override(tmp_path):
    config = tmp_path / "sim.yaml"
    config.write_text("dataset: cosmos-sim\nn_visits: 5\nseed: 9\n")
    out = tmp_path / "c"
    result = runner.invoke(app, ["simulate", "--config", str(config), "--visits", "1",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "cosmos-sim" and manifest["seed"] == 9
    assert manifest["config"]["n_visits"] == 1
    assert len(manifest["config_hash"]) == 16


@pytest.mark.slow
def test_console_script_as_subprocess(tmp_path):
    env = {**os.environ, "COLUMNS": "100"}
    version = subprocess.run([APQA, "--version"], capture_output=True, text=True, env=env,
                             check=False)
    assert version.returncode == 0 and version.stdout.strip() == f"apqa {__version__}"
    bad = subprocess.run([APQA, "simulate", "--dataset", "x", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, env=env, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error: dataset 'x'")
    assert "Traceback" not in bad.stderr
    ok = subprocess.run([APQA, "simulate", "--dataset", "crowded-sim", "--visits", "1",
                         "--out", str(tmp_path / "bulge")], capture_output=True, text=True,
                        env=env, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "crowded-sim: 2 exposures" in ok.stdout


def test_a_command_imports_only_its_own_module():
    # `apqa diff` must not pay for the simulator, GalSim rendering or scipy.signal at start-up.
    printed, modules = _modules_after("diff", "--help")
    assert "Usage: apqa diff" in printed
    assert modules.isdisjoint({"apqa.sim", "apqa.cli.simulate", "scipy.signal",
                               "apqa.pipeline.runner"})


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="BLAS pools have one thread per core")
def test_commands_run_blas_on_one_thread_unless_the_user_says_otherwise(tmp_path):
    # A BLAS pool beside apqa's own threads spins on the same cores (apqa diff 14% slower).
    from astropy.io import fits

    path = tmp_path / "image.fits"
    fits.PrimaryHDU(np.zeros((8, 8), np.float32)).writeto(path)
    from apqa.cli.app import BLAS_THREAD_VARIABLES

    clean = {k: v for k, v in os.environ.items()
             if k not in BLAS_THREAD_VARIABLES and k != "OMP_NUM_THREADS"}
    report = ("[i['num_threads'] for i in __import__('threadpoolctl').threadpool_info()"
              " if i['user_api'] == 'blas']")
    _, ours = _entry_point_then(["inspect", str(path)], report, clean)
    assert ours and set(ours) == {1}  # numpy's BLAS at least was loaded, on one thread
    _, theirs = _entry_point_then(["inspect", str(path)], report,
                                  {**clean, "OPENBLAS_NUM_THREADS": "2"})
    assert set(theirs) == {2}
