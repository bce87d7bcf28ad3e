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
        unit.json                        status, error, timings, peak memory, checksums of outputs

A unit is finished when its ``unit.json`` says ``done`` and every output it lists still has the
recorded checksum: that is what ``--resume`` checks before skipping it. Checksums are XXH3-128
(``checksum_algorithm`` in the record; runs written before it was recorded used sha256, which
is still checked): 10 GB/s here against sha256's 1 GB/s, which cost a 2048x4096 unit 0.3 s of
CPU for its 300 MB of FITS. They tell a complete file from a torn or altered one; they are
not a cryptographic seal.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import xxhash

from apqa.atomic import hash_file, write_json, write_parquet  # noqa: F401 (re-exported)
from apqa.datamodel import Exposure
from apqa.datamodel.fits_io import write_exposure as write_fits_exposure

if TYPE_CHECKING:
    from hashlib import _Hash as Hash

UNIT_FILE = "unit.json"


def unit_dir(out: Path, visit: int, detector: int) -> Path:
    """Folder of one science visit-detector."""
    return Path(out) / "units" / f"v{visit}_d{detector:02d}"


def template_dir(out: Path, detector: int) -> Path:
    """Folder of one detector's processed template."""
    return Path(out) / "templates" / f"d{detector:02d}"


#: Checksum of the run's outputs (recorded in each unit record as ``checksum_algorithm``).
CHECKSUM = "xxh3_128"


def _hasher(algorithm: str) -> Hash:
    if algorithm == "xxh3_128":
        return xxhash.xxh3_128()
    return hashlib.new(algorithm)  # sha256 in records written before checksum_algorithm


def checksum(path: Path, algorithm: str = CHECKSUM) -> str:
    """Hex checksum of a file, read in 1 MiB blocks."""
    return hash_file(path, _hasher(algorithm)).hexdigest()


def write_exposure(exposure: Exposure, path: Path) -> str:
    """Write an exposure as FITS (atomically, as :meth:`Exposure.write_fits` always does);
    returns the file's hex checksum, hashed as it was written (:func:`checksum` of the
    file)."""
    digest = _hasher(CHECKSUM)
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
    algorithm = record.get("checksum_algorithm", "sha256")
    for name, digest in record.get("checksums", {}).items():
        path = Path(folder) / name
        if not path.is_file() or checksum(path, algorithm) != digest:
            return None
    return record
