"""Benchmark: ``apqa diff`` against HOTPANTS on the same 4096x4096 files (issue 4: >= 5x faster).

HOTPANTS is not packaged for Debian or PyPI; build it yourself (it needs CFITSIO) and pass the
binary with ``--hotpants`` or the ``HOTPANTS`` environment variable. The pair is the one
``bench_diff.py`` writes: plain single-HDU FITS, science PSF wider than the template's, sky
already subtracted. HOTPANTS runs with its own defaults (21x21 kernel, three Gaussians of
degrees 6/4/2, spatial order 2, background order 1), told what it cannot read from these
headers: the valid pixel range (the sky is at zero, so its default lower limit of 0 would mask
half the sky), the gain and the read noise, to convolve the template and to normalise to the
science. Runs alternate between the two programs, since these hosts drift by tens of percent
within minutes; medians are printed with the ratio.

Run:  python benchmarks/bench_hotpants.py --hotpants /path/to/hotpants [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_diff import _fft_baseline, _write_pair
from bench_simulate import timed_process


def hotpants_args(hotpants: str, science: Path, template: Path, out: Path) -> list[str]:
    """The HOTPANTS command line for the benchmark pair (gain 4 e-/ADU, read noise 7 e-)."""
    return [hotpants, "-inim", str(science), "-tmplim", str(template), "-outim", str(out),
            "-il", "-1e5", "-tl", "-1e5", "-iu", "1e7", "-tu", "1e7",
            "-ig", "4", "-tg", "4", "-ir", "7", "-tr", "7",
            "-c", "t", "-n", "i", "-v", "0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hotpants", default=os.environ.get("HOTPANTS"),
                        help="the HOTPANTS binary (default: $HOTPANTS)")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not args.hotpants or not Path(args.hotpants).is_file():
        parser.error(f"no HOTPANTS binary at {args.hotpants!r}: pass --hotpants PATH or set "
                     "HOTPANTS (build it from its source with CFITSIO)")
    apqa = str(Path(sys.executable).parent / "apqa")
    walls: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sci, tpl = _write_pair(folder, args.size, args.size, (0.0, 0.0))
        cases = {
            "apqa diff (AL)": [apqa, "-q", "diff", "--science", str(sci), "--template",
                               str(tpl), "--out", str(folder / "apqa.fits")],
            "hotpants": hotpants_args(args.hotpants, sci, tpl, folder / "hotpants.fits"),
        }
        for _ in range(args.repeats):
            for case, command in cases.items():
                wall, rss = timed_process(command)
                walls.setdefault(case, []).append(wall)
                print(f"{case}: {wall:.2f} s wall, peak RSS {rss:.2f} GB", flush=True)
            base = _fft_baseline(args.size, args.size)
            walls.setdefault("fftconvolve baseline", []).append(base)
            print(f"  baseline fftconvolve {args.size}x{args.size} with 21x21: {base:.2f} s")
    medians = {case: statistics.median(values) for case, values in walls.items()}
    print("medians over the rounds:")
    for case, values in walls.items():
        print(f"  {case}: {medians[case]:.2f} s ({min(values):.2f}-{max(values):.2f} s)")
    print(f"HOTPANTS / apqa diff (AL): {medians['hotpants'] / medians['apqa diff (AL)']:.1f}x")


if __name__ == "__main__":
    main()
