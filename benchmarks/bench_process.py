"""Benchmark: ISR + characterize + calibrate of one 2048x4096 detector on one core
(issue: <= 6 s), and the cosmic-ray finder against astroscrappy (L.A.Cosmic) on the truth.

Whole-process wall time and peak RSS of ``apqa process`` come from ``/usr/bin/time -v``; the
per-stage times from its process.json. The astroscrappy baseline runs in the same session on the
same flat-fielded image (``pip install astroscrappy`` for it; skipped when missing).

Run:  python benchmarks/bench_process.py [--dataset hits-sim]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_simulate import timed_process


def cosmic_ray_comparison(dataset: str) -> None:
    import sep

    from apqa.pipeline.cosmic_rays import detect_cosmic_rays
    from apqa.sim import SimulationConfig, SurveySimulator

    sim = SurveySimulator(SimulationConfig(dataset=dataset, n_visits=1))
    exp = sim.exposure(sim.plans[-1].visit, 1)
    cal = sim.calibration(1)
    gain, rn = exp.raw.detector_info.gain, exp.raw.detector_info.read_noise
    with np.errstate(all="ignore"):
        image = ((exp.raw.image - cal.master_bias) / cal.master_flat).astype(np.float32)
        variance = ((np.clip(exp.raw.image - cal.master_bias, 0, None) / gain + (rn / gain) ** 2)
                    / cal.master_flat**2).astype(np.float32)
    excluded = (cal.master_flat < 0.2) | exp.saturated
    image[excluded] = 0
    truth = np.zeros(image.shape, bool)
    truth[exp.cosmic_rays["y"], exp.cosmic_rays["x"]] = True
    truth &= ~excluded
    start = time.perf_counter()
    bkg = sep.Background(image, mask=excluded)
    ours = detect_cosmic_rays(image, variance, bkg.back(), excluded, exp.psf.fwhm)
    t_ours = time.perf_counter() - start
    print(f"  cosmic rays, {truth.sum()} true pixels")
    print(f"    apqa:          {t_ours:5.2f} s, found {(ours & truth).sum()}, "
          f"false {(ours & ~truth).sum()}")
    try:
        import astroscrappy
    except ImportError:
        print("    astroscrappy not installed: baseline skipped")
        return
    start = time.perf_counter()
    crmask, _ = astroscrappy.detect_cosmics(image, inmask=excluded, gain=gain, readnoise=rn,
                                            satlevel=exp.raw.detector_info.saturation,
                                            sigclip=4.5, objlim=5.0, niter=4)
    t_lac = time.perf_counter() - start
    print(f"    astroscrappy:  {t_lac:5.2f} s, found {(crmask & truth).sum()}, "
          f"false {(crmask & ~truth).sum()}  -> apqa {t_lac / t_ours:.1f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="hits-sim")
    args = parser.parse_args()
    apqa = str(Path(sys.executable).parent / "apqa")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        timed_process([apqa, "-q", "simulate", "--dataset", args.dataset, "--visits", "1",
                       "--out", str(data)], single_core=True)
        manifest = json.loads((data / "manifest.json").read_text())
        entry = manifest["exposures"][-1]
        out = Path(tmp) / "proc"
        wall, rss = timed_process([
            apqa, "-q", "process", "--exposure", str(data / entry["raw"]),
            "--bias", str(data / entry["bias"]), "--flat", str(data / entry["flat"]),
            "--defects", str(data / entry["defects"]), "--refcat", str(data / "refcat.parquet"),
            "--out", str(out)], single_core=True)
        report = json.loads((out / "process.json").read_text())
    stages = " ".join(f"{k} {v:.2f}s" for k, v in report["timings"].items())
    print(f"dataset {args.dataset}, single core")
    print(f"  apqa process (whole process, incl. start-up and FITS I/O): {wall:.2f} s, "
          f"peak RSS {rss:.2f} GB")
    print(f"  stages: {stages} (sum {sum(report['timings'].values()):.2f} s)")
    cosmic_ray_comparison(args.dataset)


if __name__ == "__main__":
    main()
