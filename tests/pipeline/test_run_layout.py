"""Unit records and their checksums: what ``--resume`` trusts."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import xxhash

from apqa.datamodel import Exposure
from apqa.pipeline.run_layout import CHECKSUM, UNIT_FILE, checksum, finished, write_exposure


def _exposure() -> Exposure:
    image = np.random.default_rng(0).normal(0, 1, (64, 80)).astype(np.float32)
    return Exposure(image=image, variance=np.ones_like(image))


def test_checksum_is_the_written_files_and_verifies(tmp_path):
    digest = write_exposure(_exposure(), tmp_path / "science.fits")
    data = (tmp_path / "science.fits").read_bytes()
    assert CHECKSUM == "xxh3_128" and digest == xxhash.xxh3_128(data).hexdigest()
    record = {"status": "done", "checksums": {"science.fits": digest},
              "checksum_algorithm": CHECKSUM}
    (tmp_path / UNIT_FILE).write_text(json.dumps(record))
    assert finished(tmp_path) == record
    # A torn or altered file is not finished.
    (tmp_path / "science.fits").write_bytes(data[:-2880])
    assert finished(tmp_path) is None


def test_records_from_before_the_algorithm_was_recorded_are_sha256(tmp_path):
    write_exposure(_exposure(), tmp_path / "science.fits")
    old = hashlib.sha256((tmp_path / "science.fits").read_bytes()).hexdigest()
    assert checksum(tmp_path / "science.fits", "sha256") == old
    (tmp_path / UNIT_FILE).write_text(json.dumps({"status": "done",
                                                  "checksums": {"science.fits": old}}))
    assert finished(tmp_path) is not None
