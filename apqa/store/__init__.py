"""The metric store (SQLite or PostgreSQL, alembic migrations) and its exports.

Examples
--------
>>> from apqa.store import MetricStore
>>> store = MetricStore("sqlite://")
>>> run_id = store.start_run("hits-sim", "cfg")
>>> store.finish_run(run_id, "failed", "stopped by hand")
>>> store.resolve_run(run_id).status
'failed'
"""

from apqa.store.store import MetricStore, RunInfo, RunInterrupted, RunRecorder

__all__ = ["MetricStore", "RunInfo", "RunInterrupted", "RunRecorder"]
