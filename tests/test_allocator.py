"""The allocator settings of apqa commands: image buffers from the reusable heap, no THP."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import json, numpy as np
try:
    from numpy._core import multiarray
except ImportError:  # numpy < 2
    from numpy.core import multiarray
from apqa.allocator import tune_allocator
applied = tune_allocator()
hugepages_before = multiarray._set_madvise_hugepage(True)
a = np.ones(3 * 2**23, np.float32)  # 96 MiB: above every mmap threshold glibc allows
address = a.__array_interface__["data"][0]
heap = [line.split()[0] for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
lo, hi = (int(v, 16) for v in heap[0].split("-")) if heap else (0, 0)
print(json.dumps({"applied": applied, "hugepages": hugepages_before,
                  "in_heap": lo <= address < hi}))
"""


def _probe(setting: str) -> dict:
    env = {**os.environ, "APQA_TUNE_ALLOCATOR": setting}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc malloc settings")
def test_large_arrays_come_from_the_heap_without_huge_pages() -> None:
    tuned = _probe("1")
    assert tuned["applied"] == {"glibc_heap": True, "numpy_no_hugepages": True}
    assert tuned["in_heap"] and tuned["hugepages"] is False
    # Switched off, glibc maps the array on its own and numpy asks for huge pages.
    default = _probe("0")
    assert not any(default["applied"].values())
    assert not default["in_heap"] and default["hugepages"] is True
