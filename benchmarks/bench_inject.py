"""Benchmark: injection speed (issue 6: 10,000 point sources into a 4096x4096 exposure with a
spatially varying PSF <= 0.5 s on one core; 1,000 Sersic galaxies <= 3 s).

The exposure has a hits-sim-like PSF (elliptical Moffat, FWHM 4 px varying by 4% over the
image, 0.263"/px) and a TAN WCS. ``apqa.injection.inject`` is timed in a worker process pinned to
one core (``sched_setaffinity``, single-threaded BLAS/FFT), best of 3 calls after one warm-up
call (the warm-up is reported too: it includes GalSim's Sersic tables and first-touch page
faults). The whole worker process is timed with ``/usr/bin/time -v`` for its peak RSS.

Baseline, in the same run and on the same core: a naive GalSim loop, each source drawn with
GalSim's default ``drawImage`` (FFT with the pixel) into its own stamp at its local PSF
(``galsim.Moffat`` truncated and sheared like the exposure's PSF; for galaxies convolved with
the Sersic) and added to the image; also with an untruncated round Moffat, which GalSim draws
~35x faster (a cheaper PSF than the exposure's, so a lower bound for the naive loop). It is
timed on a subset (``--baseline-points``, ``--baseline-galaxies``) and extrapolated linearly to
the full count, as the script prints.

Run:  python benchmarks/bench_inject.py [--points 10000] [--galaxies 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_simulate import SINGLE_CORE, timed_process

SIZE = 4096
SCALE = 0.263


def _scene(n_points: int, n_galaxies: int, seed: int = 1):
    import numpy as np
    import pandas as pd
    from astropy.wcs import WCS

    from apqa.datamodel import DetectorInfo, Exposure, MoffatPsf, PhotoCalib, VisitInfo

    f0 = 4.0  # hits-sim-like: 1.05" seeing at 0.263"/px, 4% variation, |g| ~ 0.03
    psf = MoffatPsf(SIZE, SIZE, fwhm_coeffs=[f0, 0.02 * f0, -0.015 * f0, 0.02 * f0, 0.0,
                                              0.02 * f0],
                    g1_coeffs=[0.02, 0.01, -0.005], g2_coeffs=[-0.01, 0.004, 0.012])
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval, wcs.wcs.crpix = [145.2, -3.1], [SIZE / 2, SIZE / 2]
    wcs.wcs.cd = np.array([[-SCALE, 0.0], [0.0, SCALE]]) / 3600
    exposure = Exposure(np.zeros((SIZE, SIZE), np.float32),
                        np.full((SIZE, SIZE), 30.0, np.float32), psf=psf, wcs=wcs,
                        photo_calib=PhotoCalib.from_zero_point(30.0),
                        visit_info=VisitInfo(410001, 1, "g", "g", 61040.1, 87.0),
                        detector_info=DetectorInfo(gain=4.0, read_noise=7.0))
    rng = np.random.default_rng(seed)
    points = pd.DataFrame({"injection_id": np.arange(n_points), "kind": "point",
                           "x": rng.uniform(0, SIZE - 1, n_points),
                           "y": rng.uniform(0, SIZE - 1, n_points),
                           "mag": rng.uniform(20.0, 25.0, n_points)})
    galaxies = pd.DataFrame({
        "injection_id": np.arange(n_galaxies), "kind": "sersic",
        "x": rng.uniform(0, SIZE - 1, n_galaxies), "y": rng.uniform(0, SIZE - 1, n_galaxies),
        "mag": rng.uniform(20.0, 24.0, n_galaxies), "n": rng.uniform(0.5, 4.0, n_galaxies),
        "half_light_radius": rng.uniform(0.2, 2.0, n_galaxies),
        "q": rng.uniform(0.3, 1.0, n_galaxies), "beta": rng.uniform(0.0, 180.0, n_galaxies)})
    return exposure, points, galaxies


def _best(fn, repeats: int = 3) -> tuple[float, float]:
    """(first call, best of ``repeats`` further calls) wall seconds."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, min(times)


def _naive(exposure, catalog, limit: int, plain: bool = False) -> float:
    """Seconds for GalSim's default drawImage per source (stamp, local PSF) on ``limit``.

    ``plain`` drops the PSF's truncation and shear (an untruncated round Moffat of the local
    FWHM: cheaper for GalSim, no longer the exposure's PSF).
    """
    import galsim
    import numpy as np

    psf = exposure.psf
    calib = exposure.photo_calib.calibration_mean
    image = galsim.ImageF(SIZE, SIZE, scale=SCALE)
    rows = catalog.iloc[:limit]
    start = time.perf_counter()
    for row in rows.itertuples():
        fwhm, g1, g2 = (float(v[0]) for v in psf.params_at(np.array([row.x]),
                                                           np.array([row.y])))
        if plain:
            obj = galsim.Moffat(beta=psf.beta, fwhm=fwhm * SCALE)
        else:
            obj = galsim.Moffat(beta=psf.beta, fwhm=fwhm * SCALE,
                                trunc=psf.trunc * fwhm * SCALE).shear(g1=g1, g2=g2)
        if row.kind == "sersic":
            gal = galsim.Sersic(n=row.n, half_light_radius=row.half_light_radius).shear(
                q=row.q, beta=row.beta * galsim.degrees)
            obj = galsim.Convolve(gal, obj)
        flux = 10 ** (-0.4 * (row.mag - 31.4)) / calib
        stamp = obj.withFlux(flux).drawImage(scale=SCALE,
                                             center=galsim.PositionD(row.x + 1, row.y + 1))
        bounds = stamp.bounds & image.bounds
        if bounds.isDefined():
            image[bounds] += stamp[bounds]
    return time.perf_counter() - start


def worker(args: argparse.Namespace) -> None:
    """Runs on one core: the timings, printed as one JSON line."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from apqa.injection.draw import inject

    exposure, points, galaxies = _scene(args.points, args.galaxies)
    out = {}
    for label, cat, noise in (("points_noise", points, True), ("points_noiseless", points, False),
                              ("sersic_noise", galaxies, True)):
        first, best = _best(lambda c=cat, nz=noise: inject(exposure, c, noise=nz, seed=1))
        out[label] = {"first": first, "best": best}
    if not args.skip_baseline:
        n_p = min(args.baseline_points, args.points)
        n_g = min(args.baseline_galaxies, args.galaxies)
        out["naive_points"] = {"timed": n_p, "seconds": _naive(exposure, points, n_p)}
        out["naive_points_plain"] = {"timed": n_p,
                                     "seconds": _naive(exposure, points, n_p, plain=True)}
        out["naive_sersic"] = {"timed": n_g, "seconds": _naive(exposure, galaxies, n_g)}
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--galaxies", type=int, default=1_000)
    parser.add_argument("--baseline-points", type=int, default=2_000)
    parser.add_argument("--baseline-galaxies", type=int, default=200)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    cmd = [sys.executable, __file__, "--worker", "--points", str(args.points), "--galaxies",
           str(args.galaxies), "--baseline-points", str(args.baseline_points),
           "--baseline-galaxies", str(args.baseline_galaxies)]
    if args.skip_baseline:
        cmd.append("--skip-baseline")
    import subprocess

    env = {**os.environ, **SINGLE_CORE}
    result = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True,
                                       env=env).stdout.strip().splitlines()[-1])
    wall, rss = timed_process([*cmd, "--skip-baseline"], single_core=True)
    p, g = args.points, args.galaxies
    print(f"{p} point sources into {SIZE}x{SIZE} (varying PSF), one core, best of 3:")
    print(f"  with noise {result['points_noise']['best']:.3f} s "
          f"(first call {result['points_noise']['first']:.3f} s), "
          f"noiseless {result['points_noiseless']['best']:.3f} s   [target <= 0.5 s]")
    print(f"{g} Sersic galaxies with noise: {result['sersic_noise']['best']:.3f} s "
          f"(first call {result['sersic_noise']['first']:.3f} s)   [target <= 3 s]")
    print(f"whole worker process without baseline (start-up, scene, 12 inject calls): "
          f"{wall:.1f} s, peak RSS {rss:.2f} GB")
    if not args.skip_baseline:
        for key, label, n, ours in (
                ("naive_points", "point sources, the exposure's PSF", p,
                 result["points_noise"]["best"]),
                ("naive_points_plain", "point sources, untruncated round Moffat", p,
                 result["points_noise"]["best"]),
                ("naive_sersic", "Sersic galaxies", g, result["sersic_noise"]["best"])):
            base = result[key]
            full = base["seconds"] * n / base["timed"]
            print(f"baseline GalSim default drawImage loop ({label}): {base['seconds']:.2f} s "
                  f"for {base['timed']}, extrapolated {full:.1f} s for {n}: "
                  f"apqa is {full / ours:.1f}x faster")


if __name__ == "__main__":
    main()
