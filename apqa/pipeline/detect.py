"""Source detection with a matched filter, and windowed measurements of what was found.

The image is correlated with the PSF (a Gaussian approximating it on direct images, the
difference-image PSF itself for DIASources) and divided by the correlated noise, so the
threshold is a true S/N whatever the per-pixel variance; sep then finds and deblends footprints
on that S/N map. On difference images both polarities are searched and a positive and a
negative footprint that touch are merged into one two-lobed candidate.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import pandas as pd
import sep
from pydantic import Field
from scipy.ndimage import find_objects, gaussian_filter, label

from apqa.config import ConfigModel
from apqa.datamodel import Exposure
from apqa.errors import StageError
from apqa.pipeline.fftconv import convolve_same
from apqa.pipeline.pixels import disk, grow_disk

SIGMA_TO_FWHM = 2.3548


def matched_filter_snr(image: np.ndarray, variance: np.ndarray, masked: np.ndarray,
                       fwhm: float) -> np.ndarray:
    """S/N of a point source at each pixel, for a Gaussian PSF of this FWHM (pixels).

    With G the normalized Gaussian: ``snr = (G * D) / sqrt(G^2 * V)``, and
    ``G^2 = N(sigma / sqrt 2) / (4 pi sigma^2)``.
    """
    sigma = max(fwhm, 1.0) / SIGMA_TO_FWHM
    data = np.where(masked, 0.0, image).astype(np.float32)
    var = np.where(masked | ~np.isfinite(variance), 0.0, variance).astype(np.float32)
    num = gaussian_filter(data, sigma, mode="constant", truncate=3.0)
    den = gaussian_filter(var, sigma / np.sqrt(2), mode="constant", truncate=3.0)
    den /= np.float32(4 * np.pi * sigma**2)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(den > 0, num / np.sqrt(den), 0.0)
    return snr.astype(np.float32)


def size_pixel_stack(n_above: int) -> None:
    """Give sep's extraction a pixel stack for ``n_above`` pixels above threshold.

    sep allocates the whole stack on every call: its usual 20-million-pixel setting cost
    0.36 s per call, ten times the extraction itself on a 2-million-pixel image. A stack that
    is too small makes sep raise, never return a partial result.
    """
    sep.set_extract_pixstack(max(int(n_above) + 1024, 16_384))


def detect_sources(image: np.ndarray, variance: np.ndarray, masked: np.ndarray, fwhm: float,
                   threshold: float = 5.0, min_area: int = 5, deblend_contrast: float = 0.005,
                   ) -> tuple[pd.DataFrame, np.ndarray]:
    """Positive sources above ``threshold`` S/N (matched filter), deblended.

    Returns a catalog (x, y, peak_snr, npix, sep_flag, blended) and the segmentation map.
    """
    snr = matched_filter_snr(image, variance, masked, fwhm)
    size_pixel_stack(np.count_nonzero((snr > threshold) & ~masked))
    sep.set_sub_object_limit(4096)
    objects, segmap = sep.extract(snr, threshold, mask=masked, minarea=min_area,
                                  filter_kernel=None, deblend_cont=deblend_contrast,
                                  segmentation_map=True)
    if len(objects) == 0:
        raise StageError(f"no sources detected above S/N {threshold:g}")
    catalog = pd.DataFrame({
        "x": objects["x"], "y": objects["y"], "peak_snr": objects["peak"],
        "npix": objects["npix"], "sep_flag": objects["flag"],
        "blended": (objects["flag"] & sep.OBJ_MERGED) != 0,
    })
    return catalog, segmap


#: Mask planes whose pixels cannot trigger a DIASource: no data, bad columns, saturated cores,
#: cosmic rays and the tapered borders some algorithms leave.
DIA_EXCLUDED_PLANES = ("NO_DATA", "BAD", "SAT", "CR", "EDGE")


class DiaDetectionConfig(ConfigModel):
    """Settings of DIASource detection on a difference (or ZOGY score) image."""

    threshold: float = Field(5.0, gt=0, description="detection threshold (S/N, both signs)")
    min_area: int = Field(3, ge=1, description="minimum pixels above threshold in the S/N map")
    grow_fwhm: float = Field(1.0, ge=0, description="footprints grown by this many PSF FWHMs")
    excluded_planes: tuple[str, ...] = DIA_EXCLUDED_PLANES
    n_sky_sources: int = Field(100, ge=0, description="blank-sky positions for noise checks")
    sky_margin: int = Field(50, ge=0, description="sky sources stay this far (px) from edges")
    max_deblend_pixels: int = Field(
        10_000, ge=1, description="footprints larger than this (px above threshold) are not "
                                  "deblended: streaks and saturated-star residuals")


@dataclass
class DiaDetections:
    """What detection found on a difference image.

    Attributes
    ----------
    sources
        One row per DIASource candidate: ``x, y`` (peak of the dominant lobe), ``peak_snr``
        (signed), ``is_negative``, ``has_positive``/``has_negative`` lobes, ``pos_x, pos_y,
        pos_snr, neg_x, neg_y, neg_snr`` (NaN without that lobe), ``npix`` and the footprint's
        bounding box ``xmin, xmax, ymin, ymax``.
    footprints
        Label image (int32) of the grown, merged footprints; ``sources["footprint"]`` is the
        label of each candidate's footprint (deblended peaks may share one).
    sky
        ``x, y`` of blank-sky positions (no footprint, no excluded pixel) for noise checks.
    snr
        The S/N map that was thresholded (matched filter, or the ZOGY score).
    """

    sources: pd.DataFrame
    footprints: np.ndarray
    sky: pd.DataFrame
    snr: np.ndarray


def psf_matched_snr(image: np.ndarray, variance: np.ndarray, excluded: np.ndarray,
                    psf_image: np.ndarray) -> np.ndarray:
    """S/N of a point source at each pixel for this PSF: ``(P * D) / sqrt(P^2 * V)``.

    Excluded pixels carry neither signal nor variance, so a bad column cannot fake a source
    and a source next to one keeps an honest S/N.
    """
    kernel = (psf_image / psf_image.sum()).astype(np.float32)
    flipped = kernel[::-1, ::-1]  # correlation = convolution with the flipped kernel
    # Each full-image temporary is a fresh 32 MB on 2048x4096: the S/N is built in place.
    data = np.where(excluded, np.float32(0), image).astype(np.float32, copy=False)
    (num,) = convolve_same(data, [flipped])
    del data
    var = np.where(excluded | ~np.isfinite(variance), np.float32(0), variance
                   ).astype(np.float32, copy=False)
    (den,) = convolve_same(var, [flipped * flipped])
    del var
    with np.errstate(divide="ignore", invalid="ignore"):
        empty = den <= 1e-30 * np.nanmax(den)
        np.sqrt(den, out=den)
        snr = np.divide(num, den, out=num)
    del den
    snr[empty] = 0.0
    return np.nan_to_num(snr, copy=False, nan=0.0, posinf=0.0, neginf=0.0
                         ).astype(np.float32, copy=False)


def _extract(snr: np.ndarray, excluded: np.ndarray, config: DiaDetectionConfig,
             sign: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """sep objects and segmentation map of the pixels of ``sign * snr`` above
    ``config.threshold`` (``sign=-1``: the negative sources, without a negated image copy).

    The above-threshold regions are labelled first (8-connected, as sep does) and sep deblends
    each region in its own cut-out: difference images are nearly empty, and sep's scan of the
    whole image cost more than everything it found (~0.4 s per polarity on 2048x4096). Without
    sep's 'clean' step, which is the only part that looks across regions, the result is the
    same as one full-image call. Regions of more than ``max_deblend_pixels`` (streaks, residuals
    of saturated stars) are not deblended.
    """
    above = snr > config.threshold if sign > 0 else snr < -config.threshold
    above &= ~excluded
    labels, _ = label(above, structure=np.ones((3, 3), bool))
    del above
    segmap = np.zeros(snr.shape, np.int32)
    parts = []
    n_found = 0
    height, width = snr.shape
    sep.set_sub_object_limit(4096)
    for k, box in enumerate(find_objects(labels), start=1):
        if box is None:
            continue
        # One pixel of margin: a region's border pixels are below threshold by construction.
        ys = slice(max(box[0].start - 1, 0), min(box[0].stop + 1, height))
        xs = slice(max(box[1].start - 1, 0), min(box[1].stop + 1, width))
        cut = labels[ys, xs]
        area = int(np.count_nonzero(cut == k))
        if area < config.min_area:
            continue
        size_pixel_stack(area)
        objects, seg = sep.extract(
            np.ascontiguousarray(snr[ys, xs] if sign > 0 else -snr[ys, xs], np.float32),
            config.threshold,
            mask=excluded[ys, xs] | ((cut > 0) & (cut != k)), minarea=config.min_area,
            filter_kernel=None, clean=False, segmentation_map=True,
            **({"deblend_nthresh": 1, "deblend_cont": 1.0} if area > config.max_deblend_pixels
               else {"deblend_cont": 0.005}))
        if len(objects) == 0:
            continue
        objects = objects.copy()
        for name in ("x", "xmin", "xmax", "xpeak", "xcpeak"):
            objects[name] += xs.start
        for name in ("y", "ymin", "ymax", "ypeak", "ycpeak"):
            objects[name] += ys.start
        inside = seg > 0
        segmap[ys, xs][inside] = seg[inside] + n_found
        n_found += len(objects)
        parts.append(objects)
    if not parts:
        return np.zeros(0, _sep_objects_dtype()), segmap
    return np.concatenate(parts), segmap


@cache
def _sep_objects_dtype() -> np.dtype:
    """The record type of sep's object catalogs (sep exposes it only through a result)."""
    return sep.extract(np.zeros((3, 3), np.float32), 1.0).dtype


def detect_dia_sources(difference: Exposure, config: DiaDetectionConfig | None = None,
                       score: np.ndarray | None = None, seed: int = 0) -> DiaDetections:
    """Positive and negative DIASource candidates on a difference image.

    The S/N map is the matched filter with the difference-image PSF (or ``score``, ZOGY's
    S_corr, when given). Both polarities are thresholded; footprints are grown by
    ``grow_fwhm`` PSF FWHMs and a positive and a negative footprint that touch become one
    candidate with two lobes (a dipole to be fit). The DETECTED and DETECTED_NEGATIVE planes of
    ``difference.mask`` are set over the grown footprints.

    Examples
    --------
    >>> found = detect_dia_sources(difference)  # doctest: +SKIP
    >>> found.sources[["x", "y", "peak_snr"]]  # doctest: +SKIP
    """
    config = config or DiaDetectionConfig()
    if difference.psf is None:
        raise StageError("DIA detection: the difference image has no PSF model")
    excluded = difference.mask.is_set(list(config.excluded_planes))
    excluded |= ~np.isfinite(difference.variance) | ~np.isfinite(difference.image)
    cx, cy = (difference.width - 1) / 2, (difference.height - 1) / 2
    if score is None:
        snr = psf_matched_snr(difference.image, difference.variance, excluded,
                              difference.psf.image_at(cx, cy))
    else:
        snr = np.where(excluded, 0.0, np.nan_to_num(score)).astype(np.float32)
    pos, pos_seg = _extract(snr, excluded, config)
    neg, neg_seg = _extract(snr, excluded, config, sign=-1.0)
    grow = int(np.ceil(config.grow_fwhm * difference.psf.fwhm_at(cx, cy)))
    pos_grown = grow_footprints(pos_seg, grow)
    neg_grown = grow_footprints(neg_seg, grow)
    difference.mask.set("DETECTED", pos_grown)
    difference.mask.set("DETECTED_NEGATIVE", neg_grown)
    footprints, _ = label(pos_grown | neg_grown)
    sources = _merge_lobes(pos, neg, footprints).rename(columns={"component": "footprint"})
    boxes = find_objects(footprints)
    comp = sources["footprint"].to_numpy() - 1
    sources["xmin"] = np.array([b[1].start for b in boxes], np.int64)[comp]
    sources["xmax"] = np.array([b[1].stop - 1 for b in boxes], np.int64)[comp]
    sources["ymin"] = np.array([b[0].start for b in boxes], np.int64)[comp]
    sources["ymax"] = np.array([b[0].stop - 1 for b in boxes], np.int64)[comp]
    sky = _sky_positions(footprints > 0, excluded, config, seed)
    return DiaDetections(sources, footprints.astype(np.int32, copy=False), sky, snr)


def grow_footprints(labels: np.ndarray, radius: int) -> np.ndarray:
    """Footprints (labels > 0) grown by a disk of ``radius`` pixels, as a boolean map.

    Each footprint is grown inside its own padded bounding box, so the cost follows the
    footprints' area, not the image's.
    """
    out = np.zeros(labels.shape, bool)
    height, width = labels.shape
    for box in find_objects(labels):
        if box is None:
            continue
        ys = slice(max(box[0].start - radius, 0), min(box[0].stop + radius, height))
        xs = slice(max(box[1].start - radius, 0), min(box[1].stop + radius, width))
        out[ys, xs] |= grow_disk(labels[ys, xs] > 0, radius)
    return out


def _lobes(objects: np.ndarray, labels: np.ndarray, sign: float) -> pd.DataFrame:
    x, y = objects["x"], objects["y"]
    comp = labels[np.clip(np.rint(y).astype(int), 0, labels.shape[0] - 1),
                  np.clip(np.rint(x).astype(int), 0, labels.shape[1] - 1)]
    return pd.DataFrame({"x": x, "y": y, "snr": sign * objects["peak"],
                         "npix": objects["npix"], "component": comp})


def _merge_lobes(pos: np.ndarray, neg: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """One candidate per positive or negative detection, except that a footprint holding both
    signs becomes a single two-lobed candidate (its strongest positive and negative peaks)."""
    lobes = pd.concat([_lobes(pos, labels, 1.0), _lobes(neg, labels, -1.0)], ignore_index=True)
    lobes = lobes[lobes["component"] > 0]
    lobes = lobes.assign(strength=lobes["snr"].abs()).sort_values("strength", ascending=False)
    signs = lobes.groupby("component")["snr"].agg(lambda s: (s > 0).any() and (s < 0).any())
    mixed = lobes["component"].map(signs).astype(bool)
    # Footprints of one sign keep every deblended peak as its own candidate.
    single = lobes[~mixed]
    rows = []
    for comp, group in lobes[mixed].groupby("component", sort=False):
        p = group[group["snr"] > 0].iloc[0]
        n = group[group["snr"] < 0].iloc[0]
        main = p if p["strength"] >= n["strength"] else n
        rows.append({"component": comp, "x": main["x"], "y": main["y"], "peak_snr": main["snr"],
                     "npix": int(group["npix"].sum()),
                     "pos_x": p["x"], "pos_y": p["y"], "pos_snr": p["snr"],
                     "neg_x": n["x"], "neg_y": n["y"], "neg_snr": n["snr"]})
    positive = single["snr"] > 0
    nan = np.full(len(single), np.nan)
    singles = pd.DataFrame({
        "component": single["component"].to_numpy(), "x": single["x"].to_numpy(),
        "y": single["y"].to_numpy(), "peak_snr": single["snr"].to_numpy(),
        "npix": single["npix"].to_numpy(),
        **{f"pos_{c}": np.where(positive, single[c], nan) for c in ("x", "y", "snr")},
        **{f"neg_{c}": np.where(~positive, single[c], nan) for c in ("x", "y", "snr")},
    })
    merged = pd.concat([singles, pd.DataFrame(rows, columns=singles.columns)], ignore_index=True)
    for col in ("x", "y", "peak_snr", "pos_x", "pos_y", "pos_snr", "neg_x", "neg_y", "neg_snr"):
        merged[col] = merged[col].astype(np.float64)
    merged = merged.sort_values(["y", "x"], ignore_index=True)
    merged["is_negative"] = merged["peak_snr"] < 0
    merged["has_positive"] = merged["pos_snr"].notna()
    merged["has_negative"] = merged["neg_snr"].notna()
    merged["npix"] = merged["npix"].astype(np.int64)
    merged["component"] = merged["component"].astype(np.int64)
    return merged


def _sky_positions(busy: np.ndarray, excluded: np.ndarray, config: DiaDetectionConfig,
                   seed: int) -> pd.DataFrame:
    """Random blank positions at least a few pixels from any footprint or excluded pixel."""
    height, width = busy.shape
    m = config.sky_margin
    if config.n_sky_sources == 0 or height <= 2 * m or width <= 2 * m:
        return pd.DataFrame({"x": np.zeros(0), "y": np.zeros(0)})
    rng = np.random.default_rng([seed, 0x5C7])
    n_try = 20 * config.n_sky_sources
    x = rng.integers(m, width - m, n_try)
    y = rng.integers(m, height - m, n_try)
    # Blank: no footprint or excluded pixel within a disk of 5 px (looked up per position).
    dy, dx = np.nonzero(disk(5))
    dy, dx = dy - 5, dx - 5
    blocked = busy | excluded
    ok = ~blocked[np.clip(y[:, None] + dy[None, :], 0, height - 1),
                  np.clip(x[:, None] + dx[None, :], 0, width - 1)].any(axis=1)
    x, y = x[ok][:config.n_sky_sources], y[ok][:config.n_sky_sources]
    return pd.DataFrame({"x": x.astype(np.float64), "y": y.astype(np.float64)})
