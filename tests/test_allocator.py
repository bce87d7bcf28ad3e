"""The allocator settings of apqa commands: image buffers from the reusable heap, no THP."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

# FIRST and SECOND: tune before numpy is imported (the command line) or after (workers).
PROBE = """
FIRST
SECOND
import json, numpy as np
try:
    from numpy._core import multiarray
except ImportError:  # numpy < 2
    from numpy.core import multiarray
hugepages_before = multiarray._set_madvise_hugepage(True)
a = np.ones(3 * 2**23, np.float32)  # 96 MiB: above every mmap threshold glibc allows
address = a.__array_interface__["data"][0]
heap = [line.split()[0] for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
lo, hi = (int(v, 16) for v in heap[0].split("-")) if heap else (0, 0)
print(json.dumps({"applied": applied, "hugepages": hugepages_before,
                  "in_heap": lo <= address < hi}))
"""


def _probe(setting: str, numpy_first: bool = True) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    env["APQA_TUNE_ALLOCATOR"] = setting
    tune = "from apqa.allocator import tune_allocator; applied = tune_allocator()"
    steps = ("import numpy", tune) if numpy_first else (tune, "")
    code = PROBE.replace("FIRST", steps[0]).replace("SECOND", steps[1])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc malloc settings")
def test_large_arrays_come_from_the_heap_without_huge_pages() -> None:
    for numpy_first in (True, False):
        tuned = _probe("1", numpy_first)
        assert tuned["applied"] == {"glibc_heap": True, "numpy_no_hugepages": True}
        assert tuned["in_heap"] and tuned["hugepages"] is False
    # Switched off, glibc maps the array on its own and numpy asks for huge pages.
    default = _probe("0")
    assert not any(default["applied"].values())
    assert not default["in_heap"] and default["hugepages"] is True
