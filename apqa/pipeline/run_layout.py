"""The run directory of ``apqa inject-and-run``: where each output goes, atomic writes, checksums.

Layout (``OUT`` is ``--out``)::

    OUT/run.json                         provenance, configuration, timings, summary
    OUT/apdb.sqlite                      the APDB (unless --apdb)
    OUT/alerts/alerts_{visit}_{det}.avro alert packets per visit-detector
    OUT/templates/d{det}/calexp.fits     the processed template of each detector
    OUT/templates/d{det}/unit.json
    OUT/units/v{visit}_d{det}/           one folder per science visit-detector:
        science.fits, template.fits, difference.fits   injected calexp, warped template, diffim
        fakes.parquet, diaSources.parquet, matched.parquet
        unit.json                        status, error, timings, peak memory, sha256 of outputs

A unit is finished when its ``unit.json`` says ``done`` and every output it lists still has the
recorded sha256: that is what ``--resume`` checks before skipping it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from apqa.atomic import hash_file, write_json, write_parquet  # noqa: F401 (re-exported)
from apqa.datamodel import Exposure
from apqa.datamodel.fits_io import write_exposure as write_fits_exposure

UNIT_FILE = "unit.json"


def unit_dir(out: Path, visit: int, detector: int) -> Path:
    """Folder of one science visit-detector."""
    return Path(out) / "units" / f"v{visit}_d{detector:02d}"


def template_dir(out: Path, detector: int) -> Path:
    """Folder of one detector's processed template."""
    return Path(out) / "templates" / f"d{detector:02d}"


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    return hash_file(path, hashlib.sha256()).hexdigest()


def write_exposure(exposure: Exposure, path: Path) -> str:
    """Write an exposure as FITS (atomically, as :meth:`Exposure.write_fits` always does);
    returns the file's hex sha256, hashed as it was written (:func:`sha256` of the file)."""
    digest = hashlib.sha256()
    write_fits_exposure(exposure, path, digest=digest)
    return digest.hexdigest()


def read_unit(folder: Path) -> dict | None:
    """The unit record of a folder, or None when absent or unreadable."""
    try:
        return json.loads((Path(folder) / UNIT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def finished(folder: Path, inputs_key: str | None = None) -> dict | None:
    """The unit record if the unit is done, all its outputs match their checksums and, when
    ``inputs_key`` is given, it was made from the same inputs (see ``run_units.inputs_key``)."""
    record = read_unit(folder)
    if record is None or record.get("status") != "done":
        return None
    if inputs_key is not None and record.get("inputs_key") != inputs_key:
        return None
    for name, digest in record.get("checksums", {}).items():
        path = Path(folder) / name
        if not path.is_file() or sha256(path) != digest:
            return None
    return record
