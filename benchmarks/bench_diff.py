"""Benchmark: ``apqa diff`` on a 4096x4096 aligned plain-FITS pair (issue 4: AL + decorrelation
<= 3 s wall on 2 cores, peak RSS <= 1.5 GB; ZOGY <= 3 s), and 2048x4096 with warping.

The pair is synthetic (stars with known elliptical Moffat PSFs of different widths, Gaussian sky
noise, header WCS, GAIN, MAGZERO), written as plain single-HDU FITS as users bring them. Whole
process wall time and peak RSS come from ``/usr/bin/time -v``. The baseline run in the same
session is a plain FFT convolution of an image of the same size with a 21x21 kernel
(scipy.signal.fftconvolve), which no PSF-matching method can beat.

Run:  python benchmarks/bench_diff.py [--size 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

sys.path.insert(0, str(Path(__file__).parent))
from bench_simulate import first_touch_report, timed_process


def _write_pair(folder: Path, height: int, width: int, shift: tuple[float, float],
                seed: int = 0) -> tuple[Path, Path]:
    from apqa.datamodel import MoffatPsf, psf_stamps

    rng = np.random.default_rng(seed)
    n = int(height * width / 2000)
    x = rng.uniform(20, width - 20, n)
    y = rng.uniform(20, height - 20, n)
    flux = 10 ** rng.uniform(2.5, 5.5, n)
    paths = []
    for name, fwhm, sigma, dx, dy in (("science", 4.5, 6.0, 0.0, 0.0),
                                      ("template", 3.4, 4.0, *shift)):
        psf = MoffatPsf(width, height, [fwhm, 0.03 * fwhm], [0.02], [0.01])
        image = rng.normal(0, sigma, (height, width)).astype(np.float32)
        stamps, ix, iy = psf_stamps(psf, x + dx, y + dy)
        h = stamps.shape[1] // 2
        for k in range(n):
            y0, x0 = iy[k] - h, ix[k] - h
            if y0 < 0 or x0 < 0 or y0 + 2 * h + 1 > height or x0 + 2 * h + 1 > width:
                continue
            image[y0:y0 + 2 * h + 1, x0:x0 + 2 * h + 1] += flux[k] * stamps[k]
        header = fits.Header()
        for key, value in {"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 150.0,
                           "CRVAL2": 2.0, "CRPIX1": width / 2 + 1 - dx,
                           "CRPIX2": height / 2 + 1 - dy, "CD1_1": -0.26 / 3600, "CD1_2": 0.0,
                           "CD2_1": 0.0, "CD2_2": 0.26 / 3600, "GAIN": 4.0, "RDNOISE": 7.0,
                           "MAGZERO": 28.0, "EXPTIME": 60.0, "FILTER": "g",
                           "MJD-OBS": 60000.0}.items():
            header[key] = value
        path = folder / f"{name}.fits"
        fits.PrimaryHDU(image, header=header).writeto(path, overwrite=True)
        paths.append(path)
    return paths[0], paths[1]


def _fft_baseline(height: int, width: int) -> float:
    from scipy.signal import fftconvolve

    image = np.random.default_rng(1).normal(0, 1, (height, width)).astype(np.float32)
    kernel = np.ones((21, 21), np.float32) / 441
    start = time.perf_counter()
    fftconvolve(image, kernel, mode="same")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of all cases, interleaved (the host's speed drifts); "
                             "medians are printed after more than one")
    args = parser.parse_args()
    apqa = str(Path(sys.executable).parent / "apqa")
    walls: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sci, tpl = _write_pair(folder, args.size, args.size, (0.0, 0.0))
        (folder / "warp").mkdir()
        warp_sci, warp_tpl = _write_pair(folder / "warp", 4096, 2048, (3.3, -2.7), seed=1)

        def diff(case: str, science: Path, template: Path, *extra: str) -> None:
            wall, rss = timed_process([apqa, "-q", "diff", "--science", str(science),
                                       "--template", str(template), "--out",
                                       str(folder / "d.fits"), *extra])
            walls.setdefault(case, []).append(wall)
            print(f"{case}: {wall:.2f} s wall, peak RSS {rss:.2f} GB", flush=True)

        aligned = f"{args.size}x{args.size} aligned"
        for _ in range(args.repeats):
            diff(f"{aligned}, al", sci, tpl)
            diff(f"{aligned}, zogy", sci, tpl, "--algorithm", "zogy")
            # The same AL run with the platform's allocator defaults (see apqa.allocator).
            os.environ["APQA_TUNE_ALLOCATOR"] = "0"
            try:
                diff(f"{aligned}, al, allocator defaults", sci, tpl)
            finally:
                del os.environ["APQA_TUNE_ALLOCATOR"]
            base = _fft_baseline(args.size, args.size)
            walls.setdefault("fftconvolve baseline", []).append(base)
            print(f"  baseline fftconvolve {args.size}x{args.size} with 21x21: {base:.2f} s; "
                  f"{first_touch_report()}")
            diff("2048x4096 with warping, al", warp_sci, warp_tpl)
    if args.repeats > 1:
        print("medians over the rounds:")
        for case, values in walls.items():
            print(f"  {case}: {statistics.median(values):.2f} s "
                  f"({min(values):.2f}-{max(values):.2f} s)")


if __name__ == "__main__":
    main()
