"""Executing the task graph of ``apqa inject-and-run``: in this process, on a Dask
``LocalCluster`` of worker processes, or on an existing Dask cluster.

The graph is small: one template task per detector and one unit task per science
visit-detector, submitted as soon as its detector's template is done. Dask schedules the tasks
(no home-made scheduler); results are small dicts. Scheduler addresses:

* ``process``: run everything here, one task after the other;
* ``local:N``: a ``LocalCluster(n_workers=N, threads_per_worker=1, processes=True)``, whose
  workers are forked from a fork server that imported the pipeline (where the platform has
  one);
* ``tcp://host:port`` (or any address ``dask.distributed.Client`` accepts): an existing
  cluster whose workers see the output folder (a shared file system) and have apqa installed.
"""

from __future__ import annotations

import multiprocessing
import os
import re
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from apqa.allocator import tune_allocator, worker_environ
from apqa.errors import InputError

if TYPE_CHECKING:
    from dask.distributed import LocalCluster

    from apqa.pipeline.run_data import DatasetSource
    from apqa.pipeline.run_units import InjectRunConfig

_LOCAL = re.compile(r"local:(\d+)$")

#: Dask settings of the LocalCluster apqa starts. It serves no dashboard, so what only feeds
#: one runs rarely or not at all: each worker's statistical profiler (a stack sample of the
#: running unit every 10 ms, which takes the GIL from it) and the system, memory and
#: event-loop monitors of the scheduler, nannies and workers. Measured on 8 units on 2 workers:
#: 7.0-7.2 s of driver CPU instead of 8.1-11.2 s, 31-32 s per worker instead of 33-37 s.
LOCAL_CLUSTER_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.system-monitor.interval": "5s",
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.admin.tick.interval": "500ms",
    # No queue at the scheduler: every unit goes to a worker when submitted, and each worker
    # runs what it holds in priority (time) order. With the queue, a detector's units
    # submitted late (its template finished late) waited at the scheduler behind units the
    # workers already held, whatever their priority.
    "distributed.scheduler.worker-saturation": "inf",
}
if "forkserver" in multiprocessing.get_all_start_methods():  # POSIX; Windows keeps spawn
    # Workers are forked from one server process that imported the pipeline once, instead of
    # each starting a fresh interpreter and importing it again (~2.5 s of CPU per worker).
    LOCAL_CLUSTER_CONFIG["distributed.worker.multiprocessing-method"] = "forkserver"
#: What the fork server imports before it forks any worker.
FORKSERVER_PRELOAD = ["distributed", "apqa.pipeline.run_units"]


@dataclass(frozen=True)
class Plan:
    """What to run: template visit per detector and (visit, detector, mjd) science units."""

    source: DatasetSource
    config: InjectRunConfig
    seed: int
    out: str
    templates: dict[int, int]
    units: list[tuple[int, int, float]]
    resume: bool = False


def check_scheduler(address: str) -> str:
    """Validate a ``--scheduler`` value (see the module notes); returns it."""
    match = _LOCAL.match(address)
    if address == "process" or "://" in address or (match and int(match.group(1)) >= 1):
        return address
    raise InputError(f"--scheduler {address!r}: expected 'process', 'local:N' with N >= 1 or "
                     "a Dask scheduler address such as tcp://host:8786")


def execute(plan: Plan, scheduler: str, on_unit: Callable[[dict], None]
            ) -> tuple[list[dict], list[dict]]:
    """Run the template and unit tasks; ``on_unit`` is called with each unit record as it
    finishes (any order). Returns (template records, unit records in plan order)."""
    with Executor(scheduler) as executor:
        return executor.run(plan, on_unit)


class Executor:
    """Where the tasks run (see the module notes), opened ahead of the work.

    Entering it starts a ``local:N`` cluster in a background thread: its worker processes
    start and import while the driver goes on with its own set-up (imports, stores), instead
    of after it. :meth:`run` waits for the cluster, then runs the tasks. Leaving it closes the
    cluster it started.

    Examples
    --------
    >>> with Executor("local:2") as executor:              # doctest: +SKIP
    ...     open_the_stores()                              # while the workers start
    ...     templates, units = executor.run(plan, print)
    """

    def __init__(self, scheduler: str) -> None:
        self.scheduler = check_scheduler(scheduler)
        self._workers = int(m.group(1)) if (m := _LOCAL.match(scheduler)) else 0
        self._config = None  # the dask.config.set in force while our cluster lives
        self._starter: ThreadPoolExecutor | None = None
        self._cluster: Future[LocalCluster] | None = None
        self._closing: Future[None] | None = None

    def __enter__(self) -> Executor:
        if self._workers:
            import dask
            import distributed  # noqa: F401  (registers the distributed.* settings)

            # Allocator settings glibc reads only when a process starts (apqa.allocator) go
            # into the environment the nanny sets before it starts a worker: the fork server,
            # started with the first worker, reads them, and the workers forked from it
            # inherit them. The settings stay in force while the cluster lives
            # (dask.config.set is process-wide).
            environ = {**dask.config.get("distributed.nanny.pre-spawn-environ"),
                       **worker_environ()}
            self._config = dask.config.set({**LOCAL_CLUSTER_CONFIG,
                                            "distributed.nanny.pre-spawn-environ": environ})
            self._starter = ThreadPoolExecutor(1, thread_name_prefix="apqa-cluster")
            self._cluster = self._starter.submit(_start_local_cluster, self._workers)
        return self

    def release(self) -> None:
        """Start closing the cluster this executor started, in the background: its work is
        done, and the driver's last steps (metrics, store) run meanwhile. Leaving the block
        waits for the close to finish."""
        if self._cluster is not None and self._closing is None:
            self._closing = self._starter.submit(self._close_cluster)

    def _close_cluster(self) -> None:
        try:
            cluster = self._cluster.result()
        except Exception:  # it never started: nothing to close
            return
        cluster.close()

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self._closing is not None:
                self._closing.result()
            elif self._cluster is not None:
                self._close_cluster()
        finally:
            if self._starter is not None:
                self._starter.shutdown()
            if self._config is not None:
                self._config.__exit__(None, None, None)

    def run(self, plan: Plan, on_unit: Callable[[dict], None]
            ) -> tuple[list[dict], list[dict]]:
        """Run the template and unit tasks; ``on_unit`` is called with each unit record as
        it finishes (any order). Returns (template records, unit records in plan order)."""
        if self.scheduler == "process":
            return _in_process(plan, on_unit)
        from dask.distributed import Client

        if self._cluster is not None:
            with Client(self._cluster.result()) as client:
                # Our own worker processes get the command's allocator settings
                # (apqa.allocator); an existing cluster's workers are left as their owner
                # set them up.
                client.run(tune_allocator)
                client.run(_background_priority)
                return _on_dask(client, plan, on_unit)
        try:
            client = Client(self.scheduler, timeout="10s")
        except OSError as exc:
            raise InputError(f"--scheduler {self.scheduler}: cannot connect ({exc})") from None
        with client:
            return _on_dask(client, plan, on_unit)


#: Niceness of the worker processes apqa starts (the driver keeps 0).
WORKER_NICENESS = 5


def _background_priority() -> int:
    """Lower every thread of this (worker) process to :data:`WORKER_NICENESS`.

    The driver associates each finished unit, in time order, while the workers run the next
    ones; on a machine with as many workers as cores it competed with them as an equal and
    fell behind, leaving a backlog of ~4 s of association after the last unit (16 units on
    two workers). At a lower priority the workers yield the core the moment the driver has
    work, and use it fully otherwise. Linux sets niceness per thread (threads started later
    inherit it from their creator), so each thread of the process is set. Returns how many
    threads were set (0 where there is no /proc).
    """
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return 0
    count = 0
    for task in tasks.iterdir():
        try:
            os.setpriority(os.PRIO_PROCESS, int(task.name), WORKER_NICENESS)
            count += 1
        except (OSError, ValueError):  # the thread ended meanwhile
            pass
    return count


def _start_local_cluster(n_workers: int) -> LocalCluster:
    from dask.distributed import LocalCluster
    from distributed.utils import get_mp_context

    context = get_mp_context()
    if context.get_start_method() == "forkserver":
        # distributed sets its own preload list when it first makes the context; ours
        # replaces it (the server starts with the first worker, after this).
        context.set_forkserver_preload(FORKSERVER_PRELOAD)

    # Worker logs are silenced below CRITICAL: a unit's failure comes back through its future
    # and record, and at shutdown a worker's last heartbeat can race the closing scheduler
    # and log a harmless "Failed to communicate with scheduler" traceback.
    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                        dashboard_address=None, silence_logs=50)


def _in_process(plan: Plan, on_unit: Callable[[dict], None]) -> tuple[list[dict], list[dict]]:
    from apqa.pipeline.run_units import run_template, run_unit

    templates = {det: run_template(plan.source, plan.config, visit, det, plan.out, plan.resume)
                 for det, visit in sorted(plan.templates.items())
                 if any(d == det for _, d, _ in plan.units)}
    records = []
    for visit, det, _ in plan.units:
        record = run_unit(plan.source, plan.config, plan.seed, visit, det, plan.out,
                          templates[det], plan.resume)
        on_unit(record)
        records.append(record)
    return list(templates.values()), records


def _on_dask(client, plan: Plan, on_unit: Callable[[dict], None]
             ) -> tuple[list[dict], list[dict]]:
    from dask.distributed import as_completed

    from apqa.pipeline.run_units import run_template, run_unit

    used = sorted({det for _, det, _ in plan.units})
    # Dask runs higher priorities first: templates, then units in the plan's time order, so
    # that association (in time order, in the driver) follows the units as they finish
    # instead of waiting at the end for an early unit Dask happened to start last.
    templates = {client.submit(run_template, plan.source, plan.config, plan.templates[det],
                               det, plan.out, plan.resume, pure=False,
                               priority=len(plan.units) + 1,
                               key=f"template-d{det}"): det for det in used}
    template_records: dict[int, dict] = {}
    units: dict = {}
    done: dict[tuple[int, int], dict] = {}
    # A detector's units are submitted when its template is done, with the template's record
    # as a plain argument: as a task dependency, a worker would first fetch it from the
    # worker that made it, which answers late while it runs its next unit.
    finished = as_completed(list(templates))
    for future in finished:
        if future in templates:
            det = templates[future]
            try:
                template_records[det] = future.result()
            except Exception as exc:  # the worker died or the task could not run at all
                template_records[det] = {"visit": plan.templates[det], "detector": det,
                                         "status": "failed",
                                         "error": f"{type(exc).__name__}: {exc}"}
            for index, (visit, d, _) in enumerate(plan.units):
                if d == det:
                    unit = client.submit(run_unit, plan.source, plan.config, plan.seed, visit,
                                         det, plan.out, template_records[det], plan.resume,
                                         pure=False, priority=len(plan.units) - index,
                                         key=f"unit-v{visit}-d{det}")
                    units[unit] = (visit, det)
                    finished.add(unit)
            continue
        visit, det = units[future]
        try:
            record = future.result()
        except Exception as exc:  # the worker died or the task could not run at all
            record = {"visit": visit, "detector": det, "status": "failed",
                      "error": f"{type(exc).__name__}: {exc}"}
        done[(visit, det)] = record
        on_unit(record)
    return ([template_records[det] for det in used],
            [done[(v, d)] for v, d, _ in plan.units])
