"""Benchmark: ``apqa run`` on a 2048x2048 plain-FITS pair, end to end (issue 5: <= 10 s).

The pair is the synthetic plain-FITS pair of ``bench_diff.py`` (stars with known Moffat PSFs,
header WCS, GAIN, MAGZERO) with 200 transients added to the science image. Whole-process wall
time and peak RSS from ``/usr/bin/time -v``, one core. The baseline in the same session is
``apqa diff`` on the same files: the difference alone, without detection and measurement.

Run:  python benchmarks/bench_run.py [--size 2048]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from astropy.io import fits

sys.path.insert(0, str(Path(__file__).parent))
from bench_diff import _write_pair
from bench_simulate import timed_process


def _add_transients(path: Path, n: int, seed: int = 3) -> None:
    from apqa.datamodel import MoffatPsf, psf_stamps

    with fits.open(path) as hdul:
        image = hdul[0].data.astype(np.float32)
        header = hdul[0].header
    height, width = image.shape
    rng = np.random.default_rng(seed)
    psf = MoffatPsf(width, height, [4.5, 0.03 * 4.5], [0.02], [0.01])
    x, y = rng.uniform(40, width - 40, n), rng.uniform(40, height - 40, n)
    stamps, ix, iy = psf_stamps(psf, x, y)
    h = stamps.shape[1] // 2
    for k, flux in enumerate(10 ** rng.uniform(2.8, 4.0, n)):
        image[iy[k] - h:iy[k] + h + 1, ix[k] - h:ix[k] + h + 1] += flux * stamps[k]
    fits.PrimaryHDU(image, header=header).writeto(path, overwrite=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    apqa = str(Path(sys.executable).parent / "apqa")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sci, tpl = _write_pair(folder, args.size, args.size, (0.0, 0.0))
        _add_transients(sci, 200)
        wall, rss = timed_process([apqa, "-q", "run", "--science", str(sci), "--template",
                                   str(tpl), "--out", str(folder / "run")],
                                  single_core=True)
        info = json.loads((folder / "run" / "run.json").read_text())
        stages = " ".join(f"{k} {v:.2f}s" for k, v in info["timings"].items())
        print(f"apqa run {args.size}x{args.size}: {wall:.2f} s wall, peak RSS {rss:.2f} GB, "
              f"{info['n_dia_sources']} DIASources; stages: {stages}")
        base, base_rss = timed_process([apqa, "-q", "diff", "--science", str(sci), "--template",
                                        str(tpl), "--out", str(folder / "d.fits")],
                                       single_core=True)
        print(f"  baseline apqa diff: {base:.2f} s wall, peak RSS {base_rss:.2f} GB "
              f"(detection + measurement cost {wall - base:.2f} s)")


if __name__ == "__main__":
    main()
