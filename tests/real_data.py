"""Where the small real images kept beside the repository are (``../shared/data/real``).

``APQA_REAL_DATA`` points elsewhere (``.ci/run`` sets it when it finds the folder beside a
clone's origin rather than beside the clone). Tests that need a folder skip, naming the path
and the variable, when it is missing; under CI (``CI`` set, as ``.ci/run`` is run) they fail
instead, so that a CI run never passes without the real images.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REAL_DATA = Path(os.environ.get("APQA_REAL_DATA")
                 or Path(__file__).resolve().parents[2] / "shared" / "data" / "real")


def require_real_data(folder: str) -> Path:
    """The real-data folder ``folder``; skips the test when it is not there."""
    path = REAL_DATA / folder
    if not path.is_dir():
        message = (f"{path} not found (real test data kept outside the repository; set "
                   "APQA_REAL_DATA to its data/real folder)")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return path
