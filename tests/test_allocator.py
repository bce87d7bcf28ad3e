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
import threading
arrays = [np.ones(3 * 2**23, np.float32)]  # 96 MiB: above every mmap threshold glibc allows
# A thread's 40 MiB buffer: from a mapped heap of the thread's own arena unless tuned.
worker = threading.Thread(target=lambda: arrays.append(np.ones(10 * 2**20, np.float32)))
worker.start()
worker.join()
# The heap's mappings (huge-page advice splits them): from the first start to the last end.
heap = [[int(v, 16) for v in line.split()[0].split("-")] for line in open("/proc/self/maps")
        if line.rstrip().endswith("[heap]")]
lo, hi = (heap[0][0], heap[-1][1]) if heap else (0, 0)
in_heap = [lo <= a.__array_interface__["data"][0] < hi for a in arrays]
print(json.dumps({"applied": applied, "hugepages": hugepages_before,
                  "in_heap": in_heap[0], "thread_in_heap": in_heap[1]}))
"""


def _probe(setting: str, numpy_first: bool = True, environ: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMPY_MADVISE_HUGEPAGE", "MALLOC_ARENA_MAX")}
    env["APQA_TUNE_ALLOCATOR"] = setting
    env.update(environ or {})
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
        assert tuned["applied"] == {"glibc_heap": True, "numpy_no_hugepages": True,
                                    "one_arena": True}
        assert tuned["in_heap"] and tuned["hugepages"] is False
        # Tuned before numpy starts its BLAS threads (as the command line does), a new
        # thread allocates from the main heap; after, it may share a BLAS thread's arena.
        assert tuned["thread_in_heap"] or numpy_first
    # Switched off, glibc maps the arrays on its own and numpy asks for huge pages.
    default = _probe("0")
    assert not any(default["applied"].values())
    assert not default["in_heap"] and default["hugepages"] is True
    assert not default["thread_in_heap"]
    # A worker process is tuned after numpy is imported; its one arena comes from the
    # environment it starts with.
    assert _probe("1", numpy_first=True, environ={"MALLOC_ARENA_MAX": "1"})["thread_in_heap"]


def _task_buffer_in_heap() -> dict:
    import numpy as np

    buffer = np.ones(10 * 2**20, np.float32)  # made in the worker's task thread
    address = buffer.__array_interface__["data"][0]
    heap = [[int(v, 16) for v in line.split()[0].split("-")] for line in open("/proc/self/maps")
            if line.rstrip().endswith("[heap]")]
    lo, hi = (heap[0][0], heap[-1][1]) if heap else (0, 0)
    return {"env": os.environ.get("MALLOC_ARENA_MAX"), "in_heap": lo <= address < hi}


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc malloc settings")
def test_worker_processes_allocate_task_buffers_from_the_main_heap(monkeypatch) -> None:
    from apqa.allocator import worker_environ
    from apqa.pipeline import run_exec

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.setenv("APQA_TUNE_ALLOCATOR", "1")
    seen = []
    # The real executor on a real LocalCluster, with a probe in place of the pipeline.
    monkeypatch.setattr(run_exec, "_on_dask", lambda client, plan, on_unit: seen.append(
        client.submit(_task_buffer_in_heap, pure=False).result()) or ([], []))
    run_exec.execute(None, "local:1", lambda record: None)
    assert seen == [{"env": "1", "in_heap": True}]
    monkeypatch.setenv("APQA_TUNE_ALLOCATOR", "0")
    assert worker_environ() == {}


PREFAULT_PROBE = """
import json, resource
from apqa.allocator import prefault_heap, tune_allocator, wait_for_prefault
thread = prefault_heap(128 * 2**20, tune_allocator())
wait_for_prefault()  # (allocated while the thread holds its block, buffers would fault)
import numpy as np
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
image = np.ones(3 * 2**23, np.float32)  # 96 MiB, written through
print(json.dumps({"started": thread is not None,
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc malloc settings")
def test_a_prefaulted_heap_serves_image_buffers_without_page_faults() -> None:
    def probe(setting: str) -> dict:
        # 4 KiB pages in both runs (untuned numpy would ask for huge pages).
        env = {**os.environ, "NUMPY_MADVISE_HUGEPAGE": "0", "APQA_TUNE_ALLOCATOR": setting}
        out = subprocess.run([sys.executable, "-c", PREFAULT_PROBE], capture_output=True,
                             text=True, env=env, check=True)
        return json.loads(out.stdout)

    prefaulted = probe("1")
    # 96 MiB is 24,576 pages of 4 KiB: all of them were faulted in by the prefault thread.
    assert prefaulted["started"] and prefaulted["faults"] < 2_000
    untuned = probe("0")  # freed memory would leave the heap: nothing is prefaulted
    assert not untuned["started"] and untuned["faults"] > 20_000
