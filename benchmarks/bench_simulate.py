"""Benchmark: one 2048x4096 visit-detector simulated on one core (issue: <= 3 s, <= 1.5 GB).

Whole-process wall time and peak RSS come from ``/usr/bin/time -v`` around ``apqa simulate``.
The per-visit-detector cost is the marginal time between a 2-exposure and a 6-exposure run
(so start-up, sky and calibration frames are not counted twice). A naive GalSim simulation of the
same scene (every object drawn with ``drawImage`` convolved with its local PSF) is timed in the
same session as the baseline.

Run:  python benchmarks/bench_simulate.py [--dataset hits-sim] [--skip-baseline]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SINGLE_CORE = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


FIRST_TOUCH_PROBE = """
import time, numpy as np
start = time.perf_counter()
np.ones(2**27)  # 1 GiB, fresh pages
print(time.perf_counter() - start)
"""


def first_touch_seconds(idle: float = 3.0, huge_pages: bool = False) -> float:
    """Seconds a fresh process takes to touch 1 GiB of new memory after ``idle`` seconds.

    On the project's virtual machines, memory a process frees is handed back to the host
    (free page reporting), and touching it again costs from 0.2 to over 10 s per GiB,
    changing within minutes: every benchmark that starts processes or allocates images
    depends on it, so the benchmarks print it beside their results. ``huge_pages`` asks for
    transparent huge pages as numpy does by default; apqa's own processes use 4 KiB pages
    (:mod:`apqa.allocator`), which were several times cheaper here (0.64-0.68 s against
    2.6-3.0 s per GiB, measured alternately in session 13).
    """
    time.sleep(idle)
    env = {**os.environ, "NUMPY_MADVISE_HUGEPAGE": "1" if huge_pages else "0"}
    out = subprocess.run([sys.executable, "-c", FIRST_TOUCH_PROBE], capture_output=True,
                         text=True, check=True, env=env)
    return float(out.stdout)


def first_touch_report() -> str:
    """Both first-touch costs, for a benchmark's header line."""
    return (f"first touch of 1 GiB in a fresh process: {first_touch_seconds():.2f} s "
            f"(4 KiB pages), {first_touch_seconds(huge_pages=True):.2f} s (huge pages)")


def timed_process(args: list[str], single_core: bool = False) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of a whole process.

    The process gets the caller's environment, as a user's command would (apqa itself starts
    BLAS on one thread, :func:`apqa.cli.app.one_blas_thread`); ``single_core`` adds
    :data:`SINGLE_CORE` for benchmarks that measure one core.

    apqa's bytecode is compiled first, as ``pip install`` does: an editable install under
    PYTHONDONTWRITEBYTECODE=1 (set on these hosts) would otherwise compile apqa's modules
    from source in every timed process (0.07 s of ``apqa diff``'s start).
    """
    import compileall

    import apqa

    compileall.compile_dir(Path(apqa.__file__).parent, quiet=1)
    env = {**os.environ, **(SINGLE_CORE if single_core else {})}
    result = subprocess.run(["/usr/bin/time", "-v", *args], capture_output=True, text=True,
                            env=env, check=True)
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", result.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    hours = float(wall.group(1) or 0)
    seconds = hours * 3600 + float(wall.group(2)) * 60 + float(wall.group(3))
    return seconds, int(rss.group(1)) / 1024**2


def naive_galsim_baseline(dataset: str) -> float:
    """Seconds to draw the same scene object by object with GalSim's default drawImage."""
    import galsim
    import numpy as np

    from apqa.sim import SimulationConfig, SurveySimulator

    sim = SurveySimulator(SimulationConfig(dataset=dataset, n_visits=1))
    exp = sim.exposure(sim.plans[-1].visit, 1)  # for the object list and PSF only
    truth = exp.truth_sources
    gal = sim.sky.galaxies.set_index("object_id")
    scale = sim.spec.camera.pixel_scale
    start = time.perf_counter()
    image = galsim.ImageF(sim.spec.camera.width, sim.spec.camera.height, scale=scale)
    for row in truth.itertuples():
        fwhm, g1, g2 = (float(v[0]) for v in exp.psf.params_at(np.array([row.x]),
                                                                np.array([row.y])))
        psf = galsim.Moffat(beta=exp.psf.beta, fwhm=fwhm * scale,
                            trunc=exp.psf.trunc * fwhm * scale).shear(g1=g1, g2=g2)
        if row.kind == "galaxy":
            g = gal.loc[row.object_id]
            obj = galsim.Convolve(galsim.Sersic(n=g.sersic_n, half_light_radius=g.half_light_radius)
                                  .shear(q=g.q, beta=g.beta * galsim.degrees), psf)
        else:
            obj = psf
        stamp = obj.withFlux(max(row.flux_njy, 1e-3)).drawImage(
            scale=scale, center=galsim.PositionD(row.x + 1, row.y + 1))
        bounds = stamp.bounds & image.bounds
        if bounds.isDefined():
            image[bounds] += stamp[bounds]
    image.addNoise(galsim.PoissonNoise(galsim.BaseDeviate(1), sky_level=100.0))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="hits-sim")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    apqa = str(Path(sys.executable).parent / "apqa")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for visits in (1, 5):
            out = Path(tmp) / f"v{visits}"
            runs[visits] = timed_process([apqa, "-q", "simulate", "--dataset", args.dataset,
                                          "--visits", str(visits), "--out", str(out)],
                                         single_core=True)
    (t2, rss2), (t6, rss6) = runs[1], runs[5]
    per_exposure = (t6 - t2) / 4
    print(f"dataset {args.dataset}, single core")
    print(f"  apqa simulate, 2 exposures: {t2:6.2f} s wall, peak RSS {rss2:.2f} GB")
    print(f"  apqa simulate, 6 exposures: {t6:6.2f} s wall, peak RSS {rss6:.2f} GB")
    print(f"  per visit-detector (marginal, incl. FITS write): {per_exposure:.2f} s")
    if not args.skip_baseline:
        base = naive_galsim_baseline(args.dataset)
        print(f"  naive GalSim drawImage of the same scene (no FITS write): {base:.2f} s "
              f"-> apqa is {base / per_exposure:.1f}x faster")


if __name__ == "__main__":
    main()
