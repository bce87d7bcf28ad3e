"""Atomic file writes: a file appears under its final name whole or not at all.

Every product apqa writes (FITS exposures, Parquet tables, JSON reports) goes through
:func:`write_atomically`, so a crash or a full disk never leaves half a file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hashlib import _Hash as Hash

    import pandas as pd


def write_atomically(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    The file gets ordinary permissions (0644; ``mkstemp`` makes private files) and the folder
    is created if needed. On any error the temporary file is removed and nothing is renamed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def hash_file(path: str | Path, digest: Hash) -> Hash:
    """Feed a file's bytes to ``digest`` (a ``hashlib`` object), 1 MiB at a time; returns it."""
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest


def write_parquet(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a table as Parquet atomically (no index column)."""
    return write_atomically(path, lambda tmp: frame.to_parquet(tmp, index=False))


def write_json(data: dict, path: str | Path) -> Path:
    """Write JSON atomically (indented; numpy scalars as floats)."""
    text = json.dumps(data, indent=2, default=float)
    return write_atomically(path, lambda tmp: Path(tmp).write_text(text))
