"""Benchmark: every metric for 100,000 matched fakes (issue 8: <= 2 s).

Inputs are constructed (tests/metrics/synthetic.py): 100,000 fakes (isolated, hosted, negative)
and a DiaSource table of 100,000 detections, plus runtime, calibration and counts records.
``compute_metrics`` is timed in-process (best of 3, one core); the whole process (start-up,
imports, building the inputs) is timed with ``/usr/bin/time -v``. Baseline, in the same session:
the usual way to get a bootstrap error on m50, one unbinned maximum-likelihood fit per
replicate with ``scipy.optimize.minimize``, timed for 10 replicates of one curve and scaled to the
200 replicates x 14 curves apqa fits.

Run:  python benchmarks/bench_metrics.py [--fakes 100000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_simulate import timed_process
from metrics.synthetic import make_dia_sources, make_matched


def inputs(n: int) -> dict:
    matched = make_matched(n, seed=1)
    dia, real_ids = make_dia_sources(n // 2, n // 2, seed=2)
    return {"matched": matched, "dia_sources": dia, "real_ids": real_ids, "area_deg2": 3.0,
            "n_exposures": 20,
            "diffim": [{"visit": v, "detector": 1, "noise_ratio": 1.0} for v in range(20)],
            "calibration": [{"visit": v, "detector": 1, "psf_fwhm": 1.1,
                             "astrom_scatter": 6.0, "zero_point_error": 3.0}
                            for v in range(20)],
            "counts": {"per_visit": [{"visit": v, "numNewDiaObjects": 10,
                                      "numUnassociatedDiaObjects": 3,
                                      "numUpdatedDiaObjects": 40, "numDiaSources": 50,
                                      "numSciSources": 2000} for v in range(20)]},
            "runtime": {"total": {"wall": 300.0, "cpu": 500.0, "peak_rss": 2e9}},
            "tags": {"dataset": "hits-sim"}}


def naive_bootstrap_seconds(matched, replicates: int = 10) -> float:
    """Seconds per replicate of an unbinned scipy fit of the magnitude curve."""
    from scipy.optimize import minimize
    from scipy.special import expit

    mag = matched["truth_mag"].to_numpy()
    det = matched["matched"].to_numpy(bool)
    rng = np.random.default_rng(0)

    def nll(theta, m, d):
        p = np.clip(expit(theta[2]) * expit(-(m - theta[0]) / np.exp(theta[1])), 1e-12,
                    1 - 1e-12)
        return -np.sum(np.where(d, np.log(p), np.log1p(-p)))

    start = time.perf_counter()
    for _ in range(replicates):
        idx = rng.integers(0, len(mag), len(mag))
        minimize(nll, [24.0, np.log(0.3), 3.0], args=(mag[idx], det[idx]), method="Nelder-Mead")
    return (time.perf_counter() - start) / replicates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fakes", type=int, default=100_000)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from apqa.metrics import compute_metrics

    data = inputs(args.fakes)
    times = []
    for _ in range(1 if args.inner else 3):
        start = time.perf_counter()
        ms = compute_metrics(**data)
        times.append(time.perf_counter() - start)
    if args.inner:
        return
    n_fits = sum(m.metric in ("apqa.completeness.snr50", "apqa.completeness.m50") for m in ms)
    print(f"compute_metrics, {args.fakes} fakes + {len(data['dia_sources'])} DIASources: "
          f"best {min(times):.2f} s of 3 ({len(ms)} measurements, {n_fits} logistic fits "
          "with 200 bootstrap replicates each)")
    wall, rss = timed_process([sys.executable, __file__, "--fakes", str(args.fakes), "--inner"])
    print(f"whole process (imports, building inputs, one compute): {wall:.2f} s, "
          f"peak RSS {rss:.2f} GB")
    per_rep = naive_bootstrap_seconds(data["matched"])
    naive = per_rep * 200 * n_fits
    print(f"baseline: scipy Nelder-Mead per replicate {per_rep * 1000:.0f} ms -> "
          f"{naive:.0f} s for the same fits; apqa is {naive / min(times):.0f}x faster")


if __name__ == "__main__":
    main()
