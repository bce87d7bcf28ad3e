"""Drawing an injection catalog into an exposure (science or template).

Point sources take the fast path (:class:`~apqa.injection.psf_bank.PsfBank`: PSF images on a
sub-pixel phase grid at nodes over the image, combined with numpy); Sersic galaxies, trails and
postage stamps are GalSim profiles convolved with the PSF at their position through the local
WCS Jacobian (:mod:`apqa.injection.profiles`). Fluxes come from the AB magnitudes through the
exposure's photometric calibration. With ``noise=True`` each pixel that received light gets
Gaussian noise of variance ``counts / gain`` (the Poisson variance of the added electrons, as
Rubin's source_injection adds it) and the variance plane grows by the same amount; the noise
stream is keyed by (seed, visit, detector, target), so no two visits share it. The pixels that
received light get the INJECTED (science) or INJECTED_TEMPLATE mask plane.

Rows that cannot be drawn are left out of the image and flagged in ``injection_flag``
(:class:`InjectionFlag`).
"""

from __future__ import annotations

import dataclasses
import enum

import galsim
import numpy as np
import pandas as pd
from pydantic import Field

from apqa.config import ConfigModel
from apqa.datamodel import Exposure
from apqa.datamodel.photocalib import abmag_to_njy
from apqa.errors import InputError
from apqa.injection.catalog import KINDS
from apqa.injection.profiles import (
    ProfileError,
    draw_stamp,
    shape_values,
    stamp_size,
    world_profile,
)
from apqa.injection.psf_bank import PsfBank, centred_kernels
from apqa.log import get_logger
from apqa.sim.render import local_jacobians

log = get_logger(__name__)

PLANES = {"science": "INJECTED", "template": "INJECTED_TEMPLATE"}
_TARGET_STREAM = {"science": 0, "template": 1}


class InjectionFlag(enum.IntFlag):
    """Bits of ``injection_flag``: why a fake was not drawn (0 = drawn)."""

    BAD_MAG = 1  #: magnitude missing or not finite
    OFF_IMAGE = 2  #: centre outside the image (or position unknown)
    FFT_TOO_LARGE = 4  #: the profile needs a stamp above ``max_stamp`` pixels
    PSF_FAILURE = 8  #: the PSF model gave no usable image at the position
    UNKNOWN_KIND = 16  #: kind not one of point, sersic, trail, stamp
    BAD_SHAPE = 32  #: shape values outside their range, unreadable postage stamp


class DrawConfig(ConfigModel):
    """Drawing settings (defaults chosen by the PSF where ``None``)."""

    node_spacing: int | None = Field(None, ge=16, description="px between PSF bank nodes")
    phases: int | None = Field(None, ge=2, le=64, description="sub-pixel phases per pixel")
    max_stamp: int = Field(1024, ge=16, description="largest stamp side for extended fakes")
    sersic_trunc: float = Field(5.0, gt=1, description="Sersic truncation, half-light radii")
    sersic_n_step: float = Field(0.05, gt=0, description="Sersic index rounding step")
    tile: int = Field(256, ge=16, description="tile side for the noise and mask pass")


def fake_counts(catalog: pd.DataFrame, target: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``catalog`` drawn into ``target`` and their AB magnitude there.

    Science images get rows with target science or both at ``mag``; template images get rows
    with target template at ``mag`` and rows with target both at ``template_mag`` (``mag`` when
    that is missing). Without a ``target`` column every row is a science fake.
    """
    targets = (catalog["target"].astype(str).to_numpy() if "target" in catalog
               else np.full(len(catalog), "science"))
    mag = pd.to_numeric(catalog["mag"], errors="coerce").to_numpy(np.float64)
    if target == "science":
        return np.isin(targets, ("science", "both")), mag
    template_mag = (pd.to_numeric(catalog["template_mag"], errors="coerce").to_numpy(np.float64)
                    if "template_mag" in catalog else np.full(len(catalog), np.nan))
    both = targets == "both"
    return np.isin(targets, ("template", "both")), np.where(
        both & np.isfinite(template_mag), template_mag, mag)


def catalog_positions(exposure: Exposure, catalog: pd.DataFrame
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Pixel positions of catalog rows: from ra/dec through the WCS where given, else x/y."""
    n = len(catalog)
    x = (np.array(pd.to_numeric(catalog["x"], errors="coerce"), np.float64) if "x" in catalog
         else np.full(n, np.nan))
    y = (np.array(pd.to_numeric(catalog["y"], errors="coerce"), np.float64) if "y" in catalog
         else np.full(n, np.nan))
    if {"ra", "dec"} <= set(catalog):
        ra = pd.to_numeric(catalog["ra"], errors="coerce").to_numpy(np.float64)
        dec = pd.to_numeric(catalog["dec"], errors="coerce").to_numpy(np.float64)
        sky = np.isfinite(ra) & np.isfinite(dec)
        if sky.any():
            if exposure.wcs is None:
                raise InputError("catalog gives ra/dec but the exposure has no WCS; give x/y")
            x[sky], y[sky] = exposure.sky_to_pixel(ra[sky], dec[sky])
    return x, y


def known_gain(exposure: Exposure) -> float | None:
    """The detector gain (e-/ADU) when the exposure knows it: what drawing the fakes' Poisson
    noise needs."""
    gain = exposure.detector_info.gain if exposure.detector_info is not None else float("nan")
    return float(gain) if np.isfinite(gain) and gain > 0 else None


def _gain(exposure: Exposure) -> float:
    gain = known_gain(exposure)
    if gain is None:
        given = exposure.detector_info.gain if exposure.detector_info is not None else np.nan
        raise InputError(f"exposure: detector gain is {given} (unknown); Poisson noise needs "
                         "it: set GAIN (e-/ADU) in the header or inject without noise "
                         "(--no-noise)")
    return gain


def _add(model: np.ndarray, tiles: np.ndarray, tile: int, stamp: np.ndarray, x0: int,
         y0: int) -> None:
    """Add ``stamp`` with its first pixel at image pixel (x0, y0), clipped to the image."""
    height, width = model.shape
    sy, sx = stamp.shape
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + sx, width), min(y0 + sy, height)
    if cx0 >= cx1 or cy0 >= cy1:
        return
    model[cy0:cy1, cx0:cx1] += stamp[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    tiles[cy0 // tile:(cy1 - 1) // tile + 1, cx0 // tile:(cx1 - 1) // tile + 1] = True


def _draw_points(model: np.ndarray, tiles: np.ndarray, bank: PsfBank, x: np.ndarray,
                 y: np.ndarray, counts: np.ndarray, tile: int, chunk: int = 2048) -> np.ndarray:
    """Point sources into ``model``; returns the PSF-failure mask."""
    failed = np.zeros(x.size, bool)
    for start in range(0, x.size, chunk):
        sl = slice(start, start + chunk)
        stamps, ix, iy, bad = bank.stamps(x[sl], y[sl])
        failed[sl] = bad
        stamps *= counts[sl, None, None].astype(np.float32)
        half = stamps.shape[1] // 2
        for k in np.flatnonzero(~bad):
            _add(model, tiles, tile, stamps[k], int(ix[k]) - half, int(iy[k]) - half)
    return failed


def _draw_profiles(model: np.ndarray, tiles: np.ndarray, exposure: Exposure,
                   rows: pd.DataFrame, x: np.ndarray, y: np.ndarray, counts: np.ndarray,
                   config: DrawConfig) -> np.ndarray:
    """Sersic, trail and stamp fakes into ``model``; returns their injection flags."""
    flags = np.zeros(x.size, np.int32)
    if x.size == 0:
        return flags
    if exposure.wcs is None:
        raise InputError("sersic, trail and stamp fakes need an exposure with a WCS (their "
                         "shapes are in arcsec)")
    jac = local_jacobians(exposure.wcs, x, y)
    s_min = np.linalg.svd(jac, compute_uv=False)[:, -1]  # arcsec per pixel along the finest axis
    kernels, failed = centred_kernels(exposure.psf, x, y)
    flags[failed] |= InjectionFlag.PSF_FAILURE
    records = rows.to_dict("records")
    for k in np.flatnonzero(~failed):
        kind = str(records[k]["kind"])
        try:
            profile, radius = world_profile(
                kind, shape_values(records[k], kind), float(counts[k]),
                float(np.sqrt(abs(np.linalg.det(jac[k])))), config.sersic_trunc,
                config.sersic_n_step)
        except (ProfileError, galsim.GalSimError, ValueError, TypeError):
            flags[k] |= InjectionFlag.BAD_SHAPE
            continue
        size = stamp_size(radius / s_min[k], kernels[k].shape[0])
        if size > config.max_stamp:
            flags[k] |= InjectionFlag.FFT_TOO_LARGE
            continue
        ix, iy = int(np.rint(x[k])), int(np.rint(y[k]))
        try:
            stamp = draw_stamp(profile, jac[k], kernels[k], (x[k] - ix, y[k] - iy), size)
        except MemoryError:
            flags[k] |= InjectionFlag.FFT_TOO_LARGE
            continue
        except galsim.GalSimError:
            flags[k] |= InjectionFlag.BAD_SHAPE
            continue
        _add(model, tiles, config.tile, stamp.astype(np.float32), ix - size // 2,
             iy - size // 2)
    return flags


def _finalize(exposure: Exposure, model: np.ndarray, tiles: np.ndarray, tile: int, plane: str,
              gain: float | None, rng: np.random.Generator) -> Exposure:
    """The new exposure: image plus model (plus noise), variance and mask updated per tile."""
    image = exposure.image.copy()
    variance = exposure.variance.copy()
    mask = exposure.mask.copy()
    mask.add_plane(plane)
    bit = np.int32(mask.bitmask(plane))
    inv_gain = np.float32(1.0 / gain) if gain is not None else None
    # Tile-sized scratch buffers: every pass below stays in cache.
    added_buf = np.empty(tile * tile, np.float32)
    noise_buf = np.empty(tile * tile, np.float32)
    lit_buf = np.empty(tile * tile, bool)
    for ty, tx in np.argwhere(tiles):
        sl = (slice(ty * tile, (ty + 1) * tile), slice(tx * tile, (tx + 1) * tile))
        m = model[sl]
        size = m.size  # edge tiles are smaller: contiguous views of the buffers' starts
        if inv_gain is not None:
            added = added_buf[:size].reshape(m.shape)
            noisy = noise_buf[:size].reshape(m.shape)
            np.maximum(m, 0, out=added)
            added *= inv_gain
            variance[sl] += added
            rng.standard_normal(out=noisy, dtype=np.float32)
            noisy *= np.sqrt(added, out=added)
            image[sl] += noisy
        image[sl] += m
        lit = np.not_equal(m, 0, out=lit_buf[:size].reshape(m.shape))
        np.bitwise_or(mask.array[sl], bit, out=mask.array[sl], where=lit)
    return dataclasses.replace(exposure, image=image, variance=variance, mask=mask,
                               metadata=exposure.metadata.copy())


def inject(exposure: Exposure, catalog: pd.DataFrame, *, seed: int = 0,
           visit: int | None = None, detector: int | None = None, noise: bool = True,
           target: str = "science", config: DrawConfig | None = None
           ) -> tuple[Exposure, pd.DataFrame]:
    """Draw the fakes of ``catalog`` meant for ``target`` into a copy of ``exposure``.

    Parameters
    ----------
    exposure
        Needs a PSF and a photometric calibration; a WCS for ra/dec positions and extended
        kinds; a detector gain when ``noise`` is on.
    catalog
        Injection catalog (:mod:`apqa.injection.catalog`); bad values are flagged per row.
    seed, visit, detector
        Key of the noise stream (visit and detector default to the exposure's visit info).
    noise
        Add the fakes' Poisson noise and variance.
    target
        ``"science"`` or ``"template"`` (see :func:`fake_counts`).

    Returns
    -------
    (Exposure, DataFrame)
        The new exposure and the rows drawn for ``target`` with ``x``, ``y`` (pixels) and
        ``injection_flag`` (int32, :class:`InjectionFlag` bits; 0 = drawn).
    """
    config = config or DrawConfig()
    if target not in PLANES:
        raise InputError(f"target {target!r}: expected 'science' or 'template'")
    if exposure.psf is None or exposure.photo_calib is None:
        raise InputError("exposure: injection needs a PSF model and a photometric calibration "
                         "(MAGZERO in a plain FITS header); it has "
                         f"psf={exposure.psf is not None}, "
                         f"photo_calib={exposure.photo_calib is not None}")
    missing = [c for c in ("injection_id", "kind", "mag") if c not in catalog]
    if missing or not ({"ra", "dec"} <= set(catalog) or {"x", "y"} <= set(catalog)):
        raise InputError(f"catalog: missing columns {missing or ['ra/dec or x/y']}")
    vi = exposure.visit_info
    visit = int(visit if visit is not None else (vi.visit if vi else 0))
    detector = int(detector if detector is not None else (vi.detector if vi else 0))
    if visit < 0 or detector < 0 or seed < 0:
        raise InputError(f"seed, visit, detector: expected >= 0, got {seed}, {visit}, {detector}")
    gain = _gain(exposure) if noise else None

    chosen, mags = fake_counts(catalog, target)
    cat = catalog[chosen].reset_index(drop=True).copy()
    mag = mags[chosen]
    x, y = catalog_positions(exposure, cat)
    kind = cat["kind"].astype(str).to_numpy()
    flags = np.zeros(len(cat), np.int32)
    flags[~np.isin(kind, KINDS)] |= InjectionFlag.UNKNOWN_KIND
    flags[~np.isfinite(mag)] |= InjectionFlag.BAD_MAG
    on_image = (np.isfinite(x) & np.isfinite(y) & (x >= -0.5) & (x < exposure.width - 0.5)
                & (y >= -0.5) & (y < exposure.height - 0.5))
    flags[~on_image] |= InjectionFlag.OFF_IMAGE
    with np.errstate(invalid="ignore", over="ignore"):
        counts = np.asarray(abmag_to_njy(mag)) / exposure.photo_calib.calibration_mean

    model = np.zeros(exposure.shape, np.float32)
    tile = config.tile
    tiles = np.zeros((-(-exposure.height // tile), -(-exposure.width // tile)), bool)
    points = np.flatnonzero((flags == 0) & (kind == "point"))
    if points.size:
        bank = PsfBank(exposure.psf, exposure.shape, config.node_spacing, config.phases)
        failed = _draw_points(model, tiles, bank, x[points], y[points], counts[points], tile)
        flags[points[failed]] |= InjectionFlag.PSF_FAILURE
    extended = np.flatnonzero((flags == 0) & (kind != "point"))
    flags[extended] |= _draw_profiles(model, tiles, exposure, cat.iloc[extended],
                                      x[extended], y[extended], counts[extended], config)
    rng = np.random.default_rng(np.random.SeedSequence(
        [seed, visit, detector, _TARGET_STREAM[target]]))
    result = _finalize(exposure, model, tiles, tile, PLANES[target], gain, rng)
    result.metadata["INJSEED"] = (seed, "injection noise seed")
    result.metadata["INJTARG"] = (target, "injected as science or template")
    result.metadata["INJNUM"] = (int((flags == 0).sum()), "fakes drawn")
    cat["x"], cat["y"], cat["injection_flag"] = x, y, flags
    if (flags != 0).any():
        log.info("injection: %d of %d fakes flagged and not drawn", int((flags != 0).sum()),
                 len(cat))
    return result, cat
