"""Process-wide memory-allocation settings for image-sized work.

A 2048x4096 float32 plane is 32 MiB, just above glibc's largest mmap threshold: every such
temporary array numpy makes is a fresh ``mmap`` whose pages fault in one by one, and is
unmapped again when freed. numpy also asks for transparent huge pages on large arrays, which on
kernels set to ``defrag=madvise`` (as on the project's machines) stalls each first touch in
memory compaction. Measured on the standard 2-core machine, one ``inject-and-run`` unit spent
3.1-3.6 s of kernel time in page faults; with the settings below, 0.9 s, and its wall time fell
from 9.5 s to 6.8 s with the same peak memory.

Every thread other than the main one allocates from an arena of its own, made of 64 MiB heaps
that glibc maps and unmaps as they fill and empty. A Dask worker runs its tasks in such a
thread: its image buffers came from those heaps, and a unit peaked at 1.65 GB. The worker
processes apqa starts get one arena for the whole process (:data:`WORKER_ENVIRON`, read by
glibc when the process starts): measured on the standard machine, a unit on a worker then
peaked at 1.2 GB, with half the page faults and a third less kernel time. The command line
keeps its threads' arenas: ``apqa diff`` prepares its two images in two threads, whose
interleaved buffers in one heap raised its peak from 1.34 to 1.57 GB, and on the project's
virtual machines the first touch of memory, not the number of page faults, is what costs.

:func:`tune_allocator` is called by the command-line entry point and on the Dask workers that
apqa starts. It changes nothing but speed: set ``APQA_TUNE_ALLOCATOR=0`` to keep the defaults.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

#: ``mallopt`` parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: Free memory above this at the top of the heap goes back to the system.
TRIM_THRESHOLD_BYTES = 1 << 30
#: Environment for the worker processes apqa starts: one malloc arena (read by glibc when the
#: process starts), so that the tasks' image buffers come from the reusable main heap.
WORKER_ENVIRON = {"MALLOC_ARENA_MAX": "1"}


def tune_allocator() -> dict[str, bool]:
    """Keep freed image buffers for reuse instead of unmapping them, and do not ask for
    transparent huge pages for numpy arrays.

    Returns which of the two settings were applied (both are skipped where the platform
    lacks them, e.g. not Linux/glibc, and when ``APQA_TUNE_ALLOCATOR=0``).

    Examples
    --------
    >>> sorted(tune_allocator())
    ['glibc_heap', 'numpy_no_hugepages']
    """
    applied = {"glibc_heap": False, "numpy_no_hugepages": False}
    if os.environ.get("APQA_TUNE_ALLOCATOR", "1") == "0":
        return applied
    if "numpy" not in sys.modules:
        # numpy reads this when it is imported: `apqa --version` need not import it here.
        os.environ["NUMPY_MADVISE_HUGEPAGE"] = "0"
        applied["numpy_no_hugepages"] = True
    else:
        try:
            from numpy._core import multiarray
        except ImportError:  # numpy < 2
            from numpy.core import multiarray
        set_hugepage = getattr(multiarray, "_set_madvise_hugepage", None)
        if set_hugepage is not None:
            set_hugepage(False)
            applied["numpy_no_hugepages"] = True
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
        if mallopt is not None:
            # Image buffers come from the heap and return to it: no mmap per array.
            applied["glibc_heap"] = bool(mallopt(_M_MMAP_MAX, 0)) and bool(
                mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return applied


def worker_environ() -> dict[str, str]:
    """Environment variables for worker processes apqa starts: :data:`WORKER_ENVIRON`, or
    nothing when ``APQA_TUNE_ALLOCATOR=0``."""
    return {} if os.environ.get("APQA_TUNE_ALLOCATOR", "1") == "0" else dict(WORKER_ENVIRON)
