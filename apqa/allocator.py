"""Process-wide memory-allocation settings for image-sized work.

A 2048x4096 float32 plane is 32 MiB, just above glibc's largest mmap threshold: every such
temporary array numpy makes is a fresh ``mmap`` whose pages fault in one by one, and is
unmapped again when freed. numpy also asks for transparent huge pages on large arrays, which on
kernels set to ``defrag=madvise`` (as on the project's machines) stalls each first touch in
memory compaction. Measured on the standard 2-core machine, one ``inject-and-run`` unit spent
3.1-3.6 s of kernel time in page faults; with the settings below, 0.9 s, and its wall time fell
from 9.5 s to 6.8 s with the same peak memory.

Every thread other than the main one allocates from an arena of its own, made of 64 MiB heaps
that glibc maps and unmaps as they fill and empty, and a buffer too large for such a heap is
mapped on its own (whatever ``M_MMAP_MAX`` says) and unmapped when freed: each one faults in
afresh. One arena for the whole process keeps every buffer in the reusable main heap. A Dask
worker runs its tasks in a thread: with one arena a unit on a worker peaked at 1.2 GB instead
of 1.65 GB, with half the page faults. ``apqa diff`` prepares its two images in two threads:
one arena took its page faults from 0.55 to 0.34 million, its kernel time from 4-8 s to 2-3 s
and its peak from 1.25 to 1.16-1.20 GB (measured on the standard machine, where the first touch
of memory costs a fault in the host too). The command line sets it with ``mallopt`` before any
thread starts; the worker processes apqa starts get it in their environment
(:data:`WORKER_ENVIRON`), since a worker's threads exist before it could be set there.

:func:`tune_allocator` is called by the command-line entry point and on the Dask workers that
apqa starts. It changes nothing but speed: set ``APQA_TUNE_ALLOCATOR=0`` to keep the defaults.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

#: ``mallopt`` parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
#: Free memory above this at the top of the heap goes back to the system.
TRIM_THRESHOLD_BYTES = 1 << 30
#: Environment for the worker processes apqa starts: one malloc arena (read by glibc when the
#: process starts), so that the tasks' image buffers come from the reusable main heap.
WORKER_ENVIRON = {"MALLOC_ARENA_MAX": "1"}
#: Most of the heap a command may have faulted in ahead of need (below the trim threshold,
#: so that it stays in the heap once freed).
PREFAULT_MAX_BYTES = TRIM_THRESHOLD_BYTES - (64 << 20)


#: Name of the thread :func:`prefault_heap` starts.
_PREFAULT_THREAD = "apqa-prefault"


def tune_allocator() -> dict[str, bool]:
    """Keep freed image buffers for reuse instead of unmapping them, in one arena for all
    threads, and do not ask for transparent huge pages for numpy arrays.

    Returns which settings were applied (all are skipped where the platform lacks them, e.g.
    not Linux/glibc, and when ``APQA_TUNE_ALLOCATOR=0``). Call it before threads start: a
    thread that has allocated already keeps its own arena.

    Examples
    --------
    >>> sorted(tune_allocator())
    ['glibc_heap', 'numpy_no_hugepages', 'one_arena']
    """
    applied = {"glibc_heap": False, "numpy_no_hugepages": False, "one_arena": False}
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
            applied["one_arena"] = bool(mallopt(_M_ARENA_MAX, 1))
    return applied


def written_zeros(shape: tuple[int, ...], dtype: np.typing.DTypeLike) -> np.ndarray:
    """A zero array written through at once, for buffers that are read before they are
    written (masks, accumulators).

    ``np.zeros`` takes fresh memory from ``calloc``, which is not written: reading it maps the
    kernel's zero page, and each later write then replaces a page and flushes it from the TLB
    of every core running the process. With another thread busy, setting a plane in a fresh
    4096x4096 mask read before took 0.5 s on the project's virtual machines, against 0.01 s
    for one written through.
    """
    import numpy as np

    array = np.empty(shape, dtype)
    array.fill(0)
    return array


def worker_environ() -> dict[str, str]:
    """Environment variables for worker processes apqa starts: :data:`WORKER_ENVIRON`, or
    nothing when ``APQA_TUNE_ALLOCATOR=0``."""
    return {} if os.environ.get("APQA_TUNE_ALLOCATOR", "1") == "0" else dict(WORKER_ENVIRON)


def prefault_heap(nbytes: int, tuned: dict[str, bool]) -> threading.Thread | None:
    """Fault in up to ``nbytes`` of the heap in a background thread, then free them into it.

    A command that will fill a known amount of memory with images spends its first second
    importing Python modules on one core. Touching the heap meanwhile on the other (``memset``
    through ctypes runs without the GIL) moves the page faults off the critical path: the
    image buffers later come from pages already mapped. On the standard machine, where a page
    first touched costs a fault in the host too, ``apqa diff`` on a 4096x4096 pair took about
    0.5-0.7 s less (three runs each way, same peak memory). Nothing is done unless the heap keeps
    freed memory and all threads share one arena (``tuned`` from :func:`tune_allocator`).

    ``nbytes`` is capped at :data:`PREFAULT_MAX_BYTES` and at a quarter of the free memory.
    Returns the thread (a daemon), or None when nothing is done.
    """
    if not (tuned.get("glibc_heap") and tuned.get("one_arena")):
        return None
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    nbytes = int(min(nbytes, PREFAULT_MAX_BYTES, free // 4))
    if nbytes < (16 << 20):
        return None
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def touch() -> None:
        block = libc.malloc(nbytes)
        if block:
            libc.memset(block, 0, nbytes)
            libc.free(block)

    thread = threading.Thread(target=touch, name=_PREFAULT_THREAD, daemon=True)
    thread.start()
    return thread


def wait_for_prefault() -> None:
    """Wait until a :func:`prefault_heap` thread (if any) has freed its block into the heap.

    Image buffers allocated while the block is held land above it and leave it as a hole
    that later buffers only partly fill: ``apqa diff`` peaked up to 0.15 GB higher when its
    readers did not wait.
    """
    for thread in threading.enumerate():
        if thread.name == _PREFAULT_THREAD:
            thread.join()


def release_free_heap() -> bool:
    """Hand the heap's free memory back to the system (glibc ``malloc_trim``).

    With :func:`tune_allocator`'s settings freed image buffers stay in the heap for reuse. A
    command whose computing is done and that is about to write large files does better to
    give them back: on the project's virtual machines a page the guest has not used for a
    couple of seconds is handed back to the host (free page reporting), and touching one
    again costs a fault in the host, 1-3 s per GiB. The page cache that a written file fills
    takes pages just freed first. ``apqa diff`` writing a 200 MB difference image took
    0.64-0.68 s after 1.1 GB of computing and 0.18-0.20 s with the inputs' buffers freed
    first (trimming took 0.02 s). Returns whether the call was made (glibc only).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True

