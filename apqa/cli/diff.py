"""``apqa diff``: the difference image of two FITS images (what HOTPANTS users run)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from apqa.allocator import release_free_heap, wait_for_prefault
from apqa.cli.app import SciencePsfOption, TemplatePsfOption, all_cores, app, fail, prose
from apqa.config import load_config
from apqa.errors import ApqaError, InputError

if TYPE_CHECKING:
    from apqa.datamodel import Exposure

EPILOG = prose("""Examples:

  apqa diff --science new.fits --template ref.fits --out diff.fits

  apqa diff --science new.fits --template ref.fits --out diff.fits --algorithm zogy
  --score score.fits

  apqa diff --science new.fits --template ref.fits --out diff.fits --algorithm zogy
  --science-psf stpsf_new.fits --template-psf stpsf_ref.fits

Inputs are plain single-HDU FITS images (header WCS, GAIN, RDNOISE, SATURATE, MAGZERO,
EXPTIME, FILTER, MJD-OBS; without GAIN/RDNOISE the noise is measured from the pixels) or apqa
exposures. Background, PSFs and the kernel are estimated here; the template is warped onto the
science grid when the grids differ. The quality numbers go to OUT with .json appended.
""")


@app.command(epilog=EPILOG)
def diff(
    science: Annotated[Path, typer.Option(help="Science image (FITS).")],
    template: Annotated[Path, typer.Option(help="Template image (FITS).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Difference image to write.")],
    algorithm: Annotated[str, typer.Option(help="al (Alard-Lupton + decorrelation) or zogy.")]
    = "al",
    score: Annotated[Path | None, typer.Option(help="ZOGY score image S_corr to write.")]
    = None,
    config: Annotated[Path | None, typer.Option(help="YAML configuration file.")] = None,
    science_psf: SciencePsfOption = None,
    template_psf: TemplatePsfOption = None,
) -> None:
    """Subtract a template from a science image: PSF matching, decorrelation, difference PSF."""
    # Imports happen on this thread only: CPython (before 3.13) can fail an import that runs
    # into another thread's first import of the same package (seen: KeyError 'scipy'). The
    # readers need numpy and astropy.io.fits only, not scipy (imported while they read).
    import apqa.datamodel.fits_io  # noqa: F401 (what the readers run)
    from apqa.datamodel.direct_io import writes_direct
    from apqa.datamodel.obs_time import leap_seconds

    console = Console(stderr=True)
    try:
        if algorithm not in ("al", "zogy"):
            raise InputError(f"--algorithm {algorithm!r}: expected 'al' or 'zogy'")
        start = time.perf_counter()
        leap_seconds()  # the readers' last step needs it
        with ThreadPoolExecutor(max_workers=2) as readers:
            # The images are read while the differencing code is imported (numpy and the
            # FITS reader release the GIL for the pixels). Their WCSs are parsed only if the
            # grids differ (astropy.wcs costs 0.13 s to import).
            reading = [readers.submit(_read_after_prefault, path) for path in (science, template)]
            from apqa.pipeline.diffim.subtract import DiffConfig, prepare_pair, subtract

            cfg = load_config(DiffConfig, config).model_copy(update={"algorithm": algorithm})
            from apqa.datamodel.psf_file import read_psf_images

            # A template's PSF applies on its own grid; a warp carries it to the science's.
            psfs = read_psf_images(science_psf, template_psf)
            with all_cores(), console.status(
                    "[bold]reading and characterizing science and template") as status:
                # What a warp needs (0.35 s of imports) is imported while the images are
                # prepared, on this thread (the preparation's threads import nothing).
                sci, tmp, sci_sources = prepare_pair(
                    reading[0].result, reading[1].result, cfg, psfs,
                    meanwhile=_import_warp_modules if _grids_may_differ(science, template)
                    else None)
                status.update(f"[bold]subtracting ({algorithm})")
                result, score_image = subtract(sci, tmp, cfg, science_sources=sci_sources,
                                               with_score=score is not None)
        # The inputs are done with. Where an output goes through the page cache (the score
        # image; the difference where direct I/O is refused, see apqa.datamodel.direct_io),
        # their memory is what its cache pages reuse.
        result.template = None
        del sci, tmp, reading
        if score is not None or not writes_direct(out.absolute().parent):
            release_free_heap()
        result.difference.write_fits(out)
        if score is not None and score_image is not None:
            import numpy as np
            from astropy.io import fits

            fits.PrimaryHDU(score_image.astype(np.float32)).writeto(score, overwrite=True)
        quality = {**result.quality, "wall_time": time.perf_counter() - start}
        Path(f"{out}.json").write_text(json.dumps(quality, indent=2, default=float))
    except ApqaError as exc:
        raise fail(str(exc)) from None
    q = result.quality
    typer.echo(f"{out}: {algorithm}, noise ratio {q.get('noise_ratio', float('nan')):.3f}, "
               f"template coverage {q.get('template_coverage', 1.0):.3f}, "
               f"{quality['wall_time']:.1f} s")


def _read_after_prefault(path: Path) -> Exposure:
    """The image at ``path``, its WCS unparsed, read once the heap is faulted in (its
    buffers then come from the faulted pages, see :func:`apqa.allocator.wait_for_prefault`).
    """
    from apqa.datamodel import Exposure

    wait_for_prefault()
    return Exposure.from_fits(path, defer_wcs=True)


def _import_warp_modules() -> None:
    import astropy.wcs  # noqa: F401
    import scipy.interpolate  # noqa: F401


def _grids_may_differ(science: Path, template: Path) -> bool:
    """Whether the template will probably be warped: the files' image shapes or WCS mapping
    cards differ (the headers alone, read in milliseconds; a guess, which only decides what
    is imported when, and False when a header cannot be read: the reader reports that)."""
    from astropy.io import fits

    from apqa.datamodel.header_wcs import HeaderWcs

    grids = []
    for path in (science, template):
        try:
            with fits.open(path) as hdul:
                header = next((hdu.header for hdu in hdul if hdu.header.get("NAXIS") == 2),
                              hdul[0].header)
        except Exception:  # astropy raises many kinds for broken files; the reader reports
            return False
        grids.append((header.get("NAXIS1"), header.get("NAXIS2"), HeaderWcs(header, str(path))))
    (w1, h1, wcs1), (w2, h2, wcs2) = grids
    return (w1, h1) != (w2, h2) or not wcs1.same_mapping(wcs2)
