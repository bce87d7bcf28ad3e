"""Benchmark of ``apqa inject-and-run``: the default run, one full 2048x4096 unit's stages, and
throughput on a Dask LocalCluster with 1 and 2 worker processes, beside the host's own ceiling
(one unit alone against two independent units side by side).

Each measurement is a whole ``apqa inject-and-run`` process timed with ``/usr/bin/time -v``
(wall time, peak RSS of the driver); per-stage times and per-worker peak memory come from the
units' ``unit.json``. Run:
``python benchmarks/bench_runner.py [--units N] [--repeats R] [--out DIR]`` (the issue's
scaling target uses 16 units; fewer give a reduced run; without --out the ~11 GB of runs go to
a temporary folder that is removed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_simulate import SINGLE_CORE, first_touch_report


def timed_run(out: Path, *args: str) -> dict:
    """Run ``apqa inject-and-run`` under /usr/bin/time -v; wall s, driver peak RSS, units."""
    cmd = ["/usr/bin/time", "-v", str(Path(sys.executable).parent / "apqa"), "inject-and-run",
           "--out", str(out), "--db", str(out.parent / f"{out.name}.db"), "--quiet", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    hours, minutes, seconds = (float(g) if g else 0.0 for g in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    units = [json.loads(p.read_text()) for p in sorted(out.glob("units/*/unit.json"))]
    return {"exit": proc.returncode, "wall": hours * 3600 + minutes * 60 + seconds,
            "driver_peak_rss_gb": rss * 1024 / 1e9, "units": units}


def one_core(out: Path) -> None:
    """The issue's per-unit target: one 2048x4096 visit-detector with 200 fakes, in process, on
    one core (taskset, one BLAS/FFT thread), end to end: the unit's stages after loading its
    raw input (simulated here), then the driver's association + APDB + alerts, metrics, store.
    """
    cmd = ["taskset", "-c", "0", str(Path(sys.executable).parent / "apqa"), "inject-and-run",
           "--visits", "1", "--detectors", "1", "--n-fakes", "200", "--out", str(out),
           "--db", str(out.parent / f"{out.name}.db"), "--quiet"]
    env = {**os.environ, **SINGLE_CORE}
    subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    (unit,) = [json.loads(p.read_text()) for p in out.glob("units/*/unit.json")]
    driver = json.loads((out / "run.json").read_text())["stages"]
    load = unit["timings"]["load"]
    stages = {k: v for k, v in unit["timings"].items() if k != "load"}
    # The unit's wall time also holds what no stage times (its tables' checksums, its record).
    stages["other"] = unit["wall"] - load - sum(stages.values())
    stages.update({k: driver[k] for k in ("associate", "metrics", "store")})
    print(f"one unit on one core: load (simulate the raw) {load:.2f} s, then "
          + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
          + f"; end to end after load {sum(stages.values()):.2f} s (target <= 10 s), "
          f"unit peak RSS {unit['peak_rss_bytes'] / 1e9:.2f} GB")


def host_ceiling(root: Path) -> float:
    """The scaling this host allows two units at best: one unit alone on core 0 before and
    after two independent in-process runs side by side on cores 0 and 1 (no Dask, no shared
    driver).

    Two processes on two cores still share the memory bus, the last-level cache and, on a
    virtual machine, whatever the host gives the two vCPUs; the unit's wall time alone over
    its mean wall time side by side, times two, is the ceiling any scheduler can reach here.
    """
    env = {**os.environ, **SINGLE_CORE}

    def start(core: int, name: str) -> tuple[subprocess.Popen, Path]:
        out = root / name
        cmd = ["taskset", "-c", str(core), str(Path(sys.executable).parent / "apqa"),
               "inject-and-run", "--visits", "1", "--detectors", "1", "--scheduler", "process",
               "--out", str(out), "--db", str(root / f"{name}.db"), "--quiet"]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL), out

    def unit_wall(out: Path) -> float:
        (unit,) = [json.loads(p.read_text()) for p in out.glob("units/*/unit.json")]
        return unit["wall"]

    def alone_wall(name: str) -> float:
        proc, out = start(0, name)
        proc.wait()
        return unit_wall(out)

    # Alone before and after the pair: the host's speed drifts over minutes.
    before = alone_wall("alone_before")
    runs = [start(0, "side_a"), start(1, "side_b")]
    for proc, _ in runs:
        proc.wait()
    side = [unit_wall(out) for _, out in runs]
    after = alone_wall("alone_after")
    ceiling = 2 * (before + after) / 2 / (sum(side) / 2)
    print(f"host ceiling: a unit alone {before:.2f} s before and {after:.2f} s after, side by "
          f"side {side[0]:.2f} s and {side[1]:.2f} s: at most {ceiling:.2f}x from two "
          "processes on this host")
    return ceiling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--units", type=int, default=16, help="visit-detectors for scaling")
    parser.add_argument("--repeats", type=int, default=1,
                        help="pairs of 1- and 2-worker runs, alternating which goes first "
                             "(each pair with its own host-ceiling measurement)")
    parser.add_argument("--out", type=Path, default=None,
                        help="keep the runs here (~11 GB for 16 units); default: a temporary "
                             "folder, removed at the end")
    args = parser.parse_args()
    if args.out is None:  # the runs write ~11 GB: a temporary folder is removed afterwards
        with tempfile.TemporaryDirectory(prefix="bench_runner.") as tmp:
            run_all(Path(tmp), args.units, args.repeats)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        run_all(args.out, args.units, args.repeats)


def run_all(root: Path, n_units: int, repeats: int = 1) -> None:
    """Every measurement, with the runs' outputs under ``root``."""
    default = timed_run(root / "default")
    print(f"default run (hits-sim, 2 units of 2048x4096, local:2): {default['wall']:.1f} s wall,"
          f" exit {default['exit']}, driver peak RSS {default['driver_peak_rss_gb']:.2f} GB")
    unit = default["units"][0]
    print("one 2048x4096 unit, stages (s): " + ", ".join(
        f"{k} {v:.2f}" for k, v in unit["timings"].items())
        + f"; unit wall {unit['wall']:.1f} s, cpu {unit['cpu']:.1f} s")

    one_core(root / "one_core")

    visits = max(1, n_units // 2)
    ratios = []
    for repeat in range(repeats):
        ceiling = host_ceiling(root)
        # Alternate which worker count goes first: the host's speed drifts over minutes.
        order = (1, 2) if repeat % 2 == 0 else (2, 1)
        results, phases = {}, {}
        for workers in order:
            out = root / f"scale{workers}"
            shutil.rmtree(out, ignore_errors=True)
            res = timed_run(out, "--visits", str(visits), "--detectors", "2",
                            "--scheduler", f"local:{workers}")
            units = res["units"]
            n = len(units)
            peak = max(u["peak_rss_bytes"] for u in units) / 1e9
            results[workers] = n / res["wall"]
            # The unit phase: first unit start to last unit end (no start-up, templates,
            # metrics).
            phases[workers] = max(u["finished"] for u in units) - min(u["started"]
                                                                      for u in units)
            mean = sum(u["wall"] for u in units) / n
            cpu = sum(u["cpu"] for u in units) / n
            print(f"{n} units on {workers} worker(s): {res['wall']:.1f} s, "
                  f"{results[workers] * 60:.2f} units/min, worker peak RSS {peak:.2f} GB; "
                  f"unit phase {phases[workers]:.1f} s, a unit {mean:.2f} s wall / "
                  f"{cpu:.2f} s CPU")
        ratios.append(results[2] / results[1])
        print(f"throughput ratio 2 vs 1 workers: {ratios[-1]:.2f}x (target >= 1.8x); "
              f"unit phase alone {phases[1] / phases[2]:.2f}x; host ceiling {ceiling:.2f}x")
    if repeats > 1:
        print(f"throughput ratios over {repeats} alternated pairs: "
              + ", ".join(f"{r:.2f}x" for r in ratios)
              + f"; median {statistics.median(ratios):.2f}x")
    print(first_touch_report())


if __name__ == "__main__":
    main()
