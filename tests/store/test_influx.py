"""InfluxDB v2 export against a real VictoriaMetrics server (its InfluxDB v2 write endpoint)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from apqa.cli.app import register_commands
from apqa.errors import StageError
from apqa.metrics import Measurement
from apqa.store import MetricStore
from apqa.store.influx import export_influx

VM = shutil.which("victoria-metrics")
pytestmark = pytest.mark.skipif(VM is None, reason="victoria-metrics is not installed "
                                "(apt-get install victoria-metrics; .ci/run installs it)")
runner = CliRunner()
app = register_commands()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(port: int, data: Path) -> subprocess.Popen:
    return subprocess.Popen([VM, f"-storageDataPath={data}", f"-httpListenAddr=127.0.0.1:{port}",
                             "-loggerLevel=ERROR"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _wait_ready(port: int) -> None:
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("victoria-metrics did not start")


@pytest.fixture
def victoria(tmp_path):
    port = _free_port()
    proc = _start(port, tmp_path / "vm")
    _wait_ready(port)
    yield port
    proc.terminate()
    proc.wait(timeout=10)


def _series(port: int, expected: int) -> dict[tuple, float]:
    """Every apqa series (name and labels) with its last value, once ``expected`` are there."""
    base = f"http://127.0.0.1:{port}"
    for _ in range(50):
        urllib.request.urlopen(f"{base}/internal/force_flush", timeout=5)
        query = urllib.parse.quote('{__name__=~"apqa\\\\..*"}')
        body = urllib.request.urlopen(f"{base}/api/v1/export?match[]={query}", timeout=5).read()
        rows = [json.loads(line) for line in body.decode().splitlines() if line]
        if len(rows) >= expected:
            return {(r["metric"].pop("__name__"), tuple(sorted(r["metric"].items()))):
                    r["values"][-1] for r in rows}
        time.sleep(0.2)
    raise AssertionError(f"expected {expected} series, found {len(rows)}")


def _store(tmp_path) -> MetricStore:
    store = MetricStore(tmp_path / "m.db")
    with store.recording("hits-sim", "cfg", git_sha="0123456789abcdef", git_branch="main") as r:
        r.add([Measurement("apqa.completeness.snr50", 5.25, None, 0.125,
                           {"band": "g", "fake_class": "isolated"}),
               Measurement("apqa.runtime.wallPerDetector", 0.5, "min"),
               Measurement("apqa.completeness.m50", float("nan"))])
    return store


def test_export_round_trip(tmp_path, victoria):
    store = _store(tmp_path)
    run = store.resolve_run("latest")
    assert export_influx(store, [run], url=f"http://127.0.0.1:{victoria}", org="rubin",
                         bucket="apqa", token="t", batch_size=1) == 2  # NaN is left out
    series = _series(victoria, 5)
    run_tags = (("dataset", "hits-sim"), ("git_branch", "main"), ("git_sha", "0123456789ab"),
                ("run_id", str(run.id)))
    snr_tags = tuple(sorted((*run_tags, ("band", "g"), ("fake_class", "isolated"))))
    assert series[("apqa.completeness.snr50_value", snr_tags)] == 5.25
    assert series[("apqa.completeness.snr50_uncertainty", snr_tags)] == 0.125
    assert series[("apqa.runtime.wallPerDetector_value", run_tags)] == 0.5
    assert ("apqa.runtime.wallPerDetector_uncertainty", run_tags) not in series
    assert not any(name.startswith("apqa.completeness.m50") for name, _ in series)


def test_export_retries_until_the_server_is_up(tmp_path):
    store = _store(tmp_path)
    port = _free_port()
    procs = []
    timer = threading.Timer(1.0, lambda: procs.append(_start(port, tmp_path / "vm")))
    timer.start()
    try:
        written = export_influx(store, [store.resolve_run("latest")],
                                url=f"http://127.0.0.1:{port}", org="o", bucket="b",
                                retries=8, backoff=0.25)
        assert written == 2
        assert _series(port, 5)[("apqa.runtime.wallPerDetector_value", (
            ("dataset", "hits-sim"), ("git_branch", "main"), ("git_sha", "0123456789ab"),
            ("run_id", "1")))] == 0.5
    finally:
        timer.join()
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


def test_export_command_and_unreachable_server(tmp_path, victoria):
    _store(tmp_path)
    db = str(tmp_path / "m.db")
    result = runner.invoke(app, ["export", "influx", "--url", f"http://127.0.0.1:{victoria}",
                                 "--org", "o", "--bucket", "b", "--db", db, "--all"])
    assert result.exit_code == 0, result.output
    assert "wrote 2 points of 1 run(s)" in result.stdout
    assert len(_series(victoria, 5)) == 5
    dead = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(StageError, match=f"InfluxDB write to {dead} .* failed after 1 retries"):
        export_influx(MetricStore(db), [MetricStore(db).resolve_run(1)], url=dead, org="o",
                      bucket="b", retries=1, backoff=0.01)
    result = runner.invoke(app, ["export", "influx", "--url", dead, "--org", "o", "--bucket",
                                 "b", "--db", db, "--retries", "0"])
    assert result.exit_code == 2 and "failed after 0 retries" in result.output
