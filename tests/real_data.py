"""Where the small real images kept beside the repository are (``../shared/data/real``).

``APQA_REAL_DATA`` points elsewhere (``.ci/run`` sets it when it finds the folder beside a
clone's origin rather than beside the clone). A test that needs a missing folder fails, naming
the path and the variable: a run never passes without the real images. The tests that read
them carry the ``real_data`` marker, so a checkout without the images leaves them out visibly
(``-m "not real_data"``, reported as deselected), never by skipping them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REAL_DATA = Path(os.environ.get("APQA_REAL_DATA")
                 or Path(__file__).resolve().parents[2] / "shared" / "data" / "real")


def require_real_data(folder: str) -> Path:
    """The real-data folder ``folder``; fails the test when it is not there."""
    path = REAL_DATA / folder
    if path.is_dir():
        return path
    pytest.fail(f"{path} not found (real test data kept outside the repository; set "
                "APQA_REAL_DATA to its data/real folder, or deselect these tests with "
                "-m 'not real_data')")
