"""Matching fakes to DIASources: close pairs, signs, one-to-one, chance matches, forced flux."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from apqa.datamodel.apdb_schema import empty_table
from apqa.errors import InputError
from apqa.injection.draw import InjectionFlag, inject
from apqa.injection.match import MatchConfig, match_fakes, merge_injected

from .conftest import SCALE, counts_of, make_exposure

ZP_NJY = 10 ** (-0.4 * (30.0 - 31.4))  # nJy per count at the test zero point


def njy(mag):
    return counts_of(mag) * ZP_NJY


def dia_table(rows, exposure):
    """DiaSource table from (x, y, psfFlux nJy, isNegative) rows on ``exposure``."""
    n = len(rows)
    table = empty_table("DiaSource", n)
    x = np.array([r[0] for r in rows], float)
    y = np.array([r[1] for r in rows], float)
    ra, dec = exposure.pixel_to_sky(x, y)
    table["diaSourceId"] = 410001 * 10**8 + 100000 + np.arange(n)
    table["visit"], table["detector"], table["band"] = 410001, np.int16(1), "g"
    table["x"], table["y"], table["ra"], table["dec"] = x, y, ra, dec
    flux = np.array([r[2] for r in rows], float)
    table["psfFlux"] = flux.astype(np.float32)
    table["psfFluxErr"] = np.full(n, 50.0, np.float32)
    table["snr"] = (np.abs(flux) / 50.0).astype(np.float32)
    table["isNegative"] = pd.array([r[3] for r in rows], dtype="boolean")
    return table


@pytest.fixture
def scene():
    """A difference image holding science fakes minus template fakes, and their catalog."""
    catalog = pd.DataFrame({
        "injection_id": np.arange(10, 19),
        "kind": "point",
        "fake_class": ["isolated", "isolated", "negative", "isolated", "isolated", "isolated",
                       "variable", "isolated", "isolated"],
        "target": ["science", "science", "template", "science", "science", "science", "both",
                   "science", "science"],
        #        A: bright  B: faint  C: neg   D      E      F      V      G(off)  H
        "x": [100.0, 103.0, 300.0, 500.0, 700.0, 702.5, 300.0, -50.0, 900.0],
        "y": [100.0, 100.0, 300.0, 500.0, 700.0, 700.0, 900.0, 100.0, 1500.0],
        "mag": [18.0, 19.75, 18.5, 19.0, 19.0, 19.0, 19.0, 19.0, 21.0],
        "template_mag": [np.nan] * 6 + [20.0, np.nan, np.nan],
        "host_sb": [np.nan] * 8 + [22.5],
    })
    base = make_exposure()
    sci, sci_cat = inject(base, catalog, noise=False)
    tpl, tpl_cat = inject(base, catalog, noise=False, target="template")
    diff = make_exposure()
    diff.image = sci.image - tpl.image
    return diff, merge_injected(sci_cat, tpl_cat)


def test_match_close_pair_signs_one_to_one_and_chance(scene):
    diff, catalog = scene
    fwhm = diff.psf.fwhm
    a, b = njy(18.0), njy(19.75)
    rows = [
        # Close pair A/B (0.9 FWHM apart): the bright detection is nearer B, the faint one
        # nearer A, so nearest-neighbour matching swaps them; position + flux does not.
        (101.8, 100.0, a, False), (101.2, 100.0, b, False),
        # Negative fake C: a positive artefact on it and the negative detection 1.5 px away.
        (300.0, 300.0, 3000.0, False), (301.5, 300.0, -njy(18.5), True),
        # D has only a negative detection nearby: never matched (wrong sign).
        (500.5, 500.0, -njy(19.0), True),
        # E and F share one detection: only one of them can have it.
        (701.2, 700.0, njy(19.0), False),
        # The variable: positive difference flux f(19) - f(20).
        (300.3, 900.2, njy(19.0) - njy(20.0), False),
        # Unrelated detections 10 match radii right of H and left of E (chance coincidences
        # for the shifted positions), and one far from everything.
        (900.0 + 10 * fwhm, 1500.0, 400.0, False), (700.0 - 10 * fwhm, 700.0, 400.0, False),
        (50.0, 2000.0, 500.0, False),
    ]
    dia = dia_table(rows, diff)
    result = match_fakes(catalog, dia, diff)
    table = result.table.set_index("injection_id")
    ids = dia["diaSourceId"].to_numpy()
    got = table["diaSourceId"]
    assert got[10] == ids[0] and got[11] == ids[1]  # the pair, not swapped
    assert got[12] == ids[3]  # negative fake -> negative detection
    assert pd.isna(got[13]) and not table.loc[13, "matched"]  # wrong sign
    assert table.loc[[14, 15], "matched"].sum() == 1  # one-to-one
    assert got[16] == ids[6]
    assert not table.loc[17, "matched"]  # off the image: flagged, never matched
    assert table.loc[17, "injection_flag"] == InjectionFlag.OFF_IMAGE
    assert not table.loc[18, "matched"]
    # The chance estimate: each of E/F (whichever is unmatched uses free sources too) and H
    # finds the unrelated detection in one of four shifts.
    matched_shifts = sum(h for h, _ in result.chance_counts)
    tried = sum(t for _, t in result.chance_counts)
    assert matched_shifts == 2
    assert result.chance_fraction == pytest.approx(2 / tried)
    assert result.radius_px == pytest.approx(fwhm)
    # Distances in arcsec from the positions.
    assert table.loc[10, "match_distance"] == pytest.approx(1.8 * SCALE, rel=1e-3)
    assert table.loc[12, "match_distance"] == pytest.approx(1.5 * SCALE, rel=1e-3)
    assert table.loc[13, "match_distance"] != table.loc[13, "match_distance"]  # NaN


def test_nearest_neighbour_would_swap_the_pair(scene):
    """The flux term matters: with flux_weight 0 the pair is matched by distance alone."""
    diff, catalog = scene
    rows = [(101.8, 100.0, njy(18.0), False), (101.2, 100.0, njy(19.75), False)]
    dia = dia_table(rows, diff)
    table = match_fakes(catalog, dia, diff, MatchConfig(flux_weight=0.0)).table
    by_id = table.set_index("injection_id")["diaSourceId"]
    assert by_id[10] == dia["diaSourceId"][1] and by_id[11] == dia["diaSourceId"][0]


def test_truth_columns_and_forced_photometry(scene):
    diff, catalog = scene
    table = match_fakes(catalog, dia_table([(50.0, 2000.0, 500.0, False)], diff), diff).table
    assert list(table.columns[:19]) == [
        "injection_id", "kind", "fake_class", "visit", "detector", "band", "truth_ra",
        "truth_dec", "truth_x", "truth_y", "truth_mag", "truth_flux", "truth_flux_err",
        "forced_flux", "truth_snr", "host_sb", "injection_flag", "matched", "match_distance"]
    dia_columns = [c for c in empty_table("DiaSource").columns
                   if c not in ("visit", "detector", "band")]
    assert list(table.columns[19:]) == dia_columns
    t = table.set_index("injection_id")
    assert t["visit"].dtype == np.int64 and t["detector"].dtype == np.int16
    assert (t["band"] == "g").all() and (t["visit"] == 410001).all()
    assert t.loc[12, "truth_flux"] == pytest.approx(-njy(18.5))
    assert t.loc[16, "truth_flux"] == pytest.approx(njy(19.0) - njy(20.0))
    assert t.loc[12, "truth_mag"] == pytest.approx(18.5)
    # Forced PSF photometry at the truth position recovers the truth (isolated fakes).
    for k in (12, 13, 16, 18):
        assert t.loc[k, "forced_flux"] == pytest.approx(t.loc[k, "truth_flux"], rel=2e-3)
    # Its error is the PSF-weighted noise: sqrt(V / sum(P^2)) for a constant variance V.
    p = diff.psf.image_at(900.0, 1500.0).astype(np.float64)
    expected = np.sqrt(25.0 / (p**2).sum()) * ZP_NJY
    assert t.loc[18, "truth_flux_err"] == pytest.approx(expected, rel=2e-3)
    assert t.loc[18, "truth_snr"] == pytest.approx(njy(21.0) / expected, rel=2e-3)
    assert t.loc[18, "host_sb"] == 22.5
    assert np.isnan(t.loc[17, "forced_flux"])  # off the image
    # Unmatched rows carry nulls in DiaSource columns, with nullable dtypes.
    assert t["diaSourceId"].dtype == "Int64" and t["diaSourceId"].isna().all()
    assert t["isNegative"].dtype == "boolean"
    x, y = diff.sky_to_pixel(t["truth_ra"], t["truth_dec"])
    ok = np.isfinite(t["truth_x"])
    assert np.allclose(x[ok], t["truth_x"][ok], atol=1e-6)
    assert np.allclose(y[ok], t["truth_y"][ok], atol=1e-6)


def test_merge_and_bad_inputs(scene):
    diff, catalog = scene
    assert catalog["injection_flag"].tolist() == [0] * 7 + [int(InjectionFlag.OFF_IMAGE), 0]
    with pytest.raises(InputError, match=r"DiaSource table: missing columns \['psfFlux'\]"):
        match_fakes(catalog, dia_table([], diff).drop(columns=["psfFlux"]), diff)
    diff.photo_calib = None
    with pytest.raises(InputError, match="photometric calibration"):
        match_fakes(catalog, dia_table([], diff), diff)


def test_empty_source_table_leaves_everything_unmatched(scene):
    diff, catalog = scene
    result = match_fakes(catalog, dia_table([], diff), diff)
    assert not result.table["matched"].any()
    assert result.chance_fraction == 0.0
