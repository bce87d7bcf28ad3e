"""Association on constructed cases: close pairs, proper-motion drift, new objects, summaries."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import linear_sum_assignment

from apqa.datamodel.apdb_schema import empty_table
from apqa.errors import InputError
from apqa.pipeline.associate import (
    ARCSEC,
    AssociationConfig,
    assign,
    associate,
    candidate_pairs,
    pair_costs,
)

RA0, DEC0 = 150.0, 2.0


def sources(dra_arcsec, ddec_arcsec, *, visit=2, mjd=60002.0, err_arcsec=0.1, band="g",
            flux=1000.0, first_id=None) -> pd.DataFrame:
    """DiaSources at offsets (arcsec, on the sky) from (RA0, DEC0)."""
    dra = np.atleast_1d(np.asarray(dra_arcsec, float))
    n = dra.size
    table = empty_table("DiaSource", n)
    base = visit * 100_000_000 + 100_000 if first_id is None else first_id
    table["diaSourceId"] = base + np.arange(n)
    table["visit"], table["detector"], table["band"] = visit, 1, band
    table["midpointMjdTai"] = mjd
    table["ra"] = RA0 + dra * ARCSEC / np.cos(np.radians(DEC0))
    table["dec"] = DEC0 + np.broadcast_to(np.asarray(ddec_arcsec, float), (n,)) * ARCSEC
    table["raErr"] = table["decErr"] = err_arcsec * ARCSEC
    table["psfFlux"] = np.broadcast_to(np.asarray(flux, float), (n,))
    table["psfFluxErr"] = 100.0
    table["timeProcessedMjdTai"] = mjd + 0.5
    return table


def objects(dra_arcsec, ddec_arcsec=0.0, err_arcsec=0.05) -> pd.DataFrame:
    dra = np.atleast_1d(np.asarray(dra_arcsec, float))
    table = empty_table("DiaObject", dra.size)
    table["diaObjectId"] = 1000 + np.arange(dra.size)
    table["ra"] = RA0 + dra * ARCSEC / np.cos(np.radians(DEC0))
    table["dec"] = DEC0 + np.broadcast_to(np.asarray(ddec_arcsec, float), (dra.size,)) * ARCSEC
    table["raErr"] = table["decErr"] = err_arcsec * ARCSEC
    table["nDiaSources"] = 1
    table["validityStartMjdTai"] = 60001.0
    return table


def test_global_assignment_beats_nearest_neighbour():
    # Objects A (0") and B (0.8"). s1 at 0.45" is nearer to B, but s2 at 1.1" can only reach B
    # (1.1" from A is beyond the radius): the one-to-one optimum pairs s1-A and s2-B.
    result = associate(sources([0.45, 1.1], 0.0), objects([0.0, 0.8]), history=None)
    assert result.dia_sources["diaObjectId"].tolist() == [1000, 1001]
    assert result.counts["numNewDiaObjects"] == 0
    assert result.counts["numAssociatedDiaSources"] == 2
    assert result.counts["fracUpdatedDiaObjects"] == 1.0


def test_pair_cost_is_rubins_likelihood():
    src = sources([0.3], [-0.2], err_arcsec=0.3)
    obj = objects([0.0], 0.0, err_arcsec=0.01)  # below the 0.05" floor
    cost = pair_costs(src, obj, np.array([0]), np.array([0]), AssociationConfig())
    s2 = 0.3**2 + 0.05**2
    expected = 0.5 * (0.3**2 / s2 + 0.2**2 / s2) + 0.5 * np.log(s2 * s2)
    assert cost[0] == pytest.approx(expected, rel=1e-9)
    src["raErr"] = np.nan  # missing errors fall back to 0.2"
    cost = pair_costs(src, obj, np.array([0]), np.array([0]), AssociationConfig())
    f2 = 0.2**2 + 0.05**2
    assert cost[0] == pytest.approx(0.5 * (0.09 / f2 + 0.04 / s2) + 0.5 * np.log(f2 * s2),
                                    rel=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_assignment_is_optimal_on_dense_random_cases(seed):
    # Crowded: 40 sources and 40 objects in a 3" box, so most sources have several candidates.
    rng = np.random.default_rng(seed)
    src = sources(rng.uniform(0, 3, 40), rng.uniform(0, 3, 40),
                  err_arcsec=rng.uniform(0.02, 0.3, 40))
    obj = objects(rng.uniform(0, 3, 40), rng.uniform(0, 3, 40))
    si, oj = candidate_pairs(src["ra"].to_numpy(), src["dec"].to_numpy(), obj["ra"].to_numpy(),
                             obj["dec"].to_numpy(), ARCSEC)
    cost = pair_costs(src, obj, si, oj, AssociationConfig())
    match = assign(si, oj, cost, len(src))
    # Brute force: a dense matrix with a large cost for "no match", solved exactly.
    big = 1e6
    dense = np.full((40, 80), big * 10)
    dense[si, oj] = cost
    dense[np.arange(40), 40 + np.arange(40)] = big
    rows, cols = linear_sum_assignment(dense)
    expected = np.where(cols < 40, cols, -1)[np.argsort(rows)]
    assert (match >= 0).sum() == (expected >= 0).sum()
    pair_total = {tuple(map(int, p)): c for p, c in zip(zip(si, oj, strict=True), cost,
                                                        strict=True)}
    ours = sum(pair_total[(i, int(j))] for i, j in enumerate(match) if j >= 0)
    best = sum(pair_total[(i, int(j))] for i, j in enumerate(expected) if j >= 0)
    assert ours == pytest.approx(best, abs=1e-9)
    assert len(set(match[match >= 0].tolist())) == (match >= 0).sum()  # one-to-one


def test_more_than_eight_candidates_are_all_considered():
    # Twelve objects within 1" of the source: the nearest-k query is not enough, the ball query
    # must find the best one (the 11th in index order, 0.05" away).
    offsets = np.linspace(0.3, 0.9, 12)
    offsets[10] = 0.05
    result = associate(sources([0.0], 0.0), objects(offsets), history=None)
    assert result.dia_sources["diaObjectId"].tolist() == [1010]


def test_proper_motion_drift_stays_one_object():
    # A star moving 0.25"/epoch: each epoch lands within 1" of the running mean position.
    step = 0.25
    objs = empty_table("DiaObject")
    history = empty_table("DiaSource")
    for epoch in range(5):
        new = sources([epoch * step], 0.0, visit=10 + epoch, mjd=60000.0 + epoch)
        result = associate(new, objs, history=history)
        history = pd.concat([history, result.dia_sources], ignore_index=True)
        objs = result.dia_objects
    assert history["diaObjectId"].nunique() == 1
    assert history["diaObjectId"].iloc[0] == history["diaSourceId"].iloc[0]
    final = objs.iloc[0]
    assert final["nDiaSources"] == 5 and final["g_psfFluxNdata"] == 5
    mean_ra = RA0 + np.mean(np.arange(5) * step) * ARCSEC / np.cos(np.radians(DEC0))
    assert final["ra"] == pytest.approx(mean_ra, abs=1e-10)
    assert final["dec"] == pytest.approx(DEC0, abs=1e-10)
    assert final["firstDiaSourceMjdTai"] == 60000.0 and final["lastDiaSourceMjdTai"] == 60004.0
    assert final["validityStartMjdTai"] == 60004.0
    # Equal errors: the mean position's error is the per-source error / sqrt(5).
    assert final["raErr"] == pytest.approx(0.1 * ARCSEC / np.sqrt(5), rel=1e-6)


def test_new_objects_filters_and_counts():
    src = sources([0.1, 5.0, 10.0, 15.0, 20.0], 0.0)
    src["reliability"] = [0.9, 0.9, 0.1, 0.9, 0.9]
    src["pixelFlags_nodataCenter"] = pd.array([False, False, False, True, None], "boolean")
    obj = objects([0.0, 30.0, 40.0])
    config = AssociationConfig(new_object_min_reliability=0.5)
    result = associate(src, obj, config, history=None)
    ids = result.dia_sources["diaObjectId"]
    assert ids.iloc[0] == 1000
    assert ids.iloc[1] == src["diaSourceId"].iloc[1]  # new object keeps the source's id
    assert ids.iloc[2:4].isna().all()  # low reliability, no-data centre: no object
    assert ids.iloc[4] == src["diaSourceId"].iloc[4]  # a null flag does not reject
    assert result.counts == {
        "numDiaSources": 5, "numAssociatedDiaSources": 1, "numNewDiaObjects": 2,
        "numUpdatedDiaObjects": 1, "numUnassociatedDiaObjects": 2,
        "fracUpdatedDiaObjects": pytest.approx(1 / 3), "numSsSources": 0,
        "numFilteredDiaSources": 2}
    assert sorted(result.dia_objects["diaObjectId"]) == sorted([1000, *ids.iloc[[1, 4]]])
    footprint = result.footprint_objects
    assert sorted(footprint["diaObjectId"]) == sorted([1000, 1001, 1002, *ids.iloc[[1, 4]]])
    assert footprint.set_index("diaObjectId").loc[1000, "nDiaSources"] == 1  # no history given
    assert footprint.set_index("diaObjectId").loc[1001, "validityStartMjdTai"] == 60001.0
    with pytest.raises(InputError, match="'pixelFlags_nope', which is not a DiaSource column"):
        associate(src, obj, AssociationConfig(new_object_reject_flags=["pixelFlags_nope"]),
                  history=None)


def test_solar_system_sources_are_skipped_and_keep_their_id():
    src = sources([0.0, 0.05], 0.0)
    src["ssObjectId"] = pd.array([None, 77], "Int64")
    result = associate(src, objects([0.0]), history=None)
    assert result.dia_sources["diaObjectId"].tolist()[0] == 1000
    assert pd.isna(result.dia_sources["diaObjectId"].iloc[1])
    assert result.dia_sources["ssObjectId"].iloc[1] == 77
    assert result.counts["numSsSources"] == 1


def test_summaries_per_band_from_history():
    obj = objects([0.0])
    hist = pd.concat([
        sources([0.0], 0.0, visit=3, mjd=60000.0, band="g", flux=900.0),
        sources([0.0], 0.0, visit=4, mjd=60001.0, band="r", flux=500.0),
        sources([0.0], 0.0, visit=5, mjd=60002.0, band="g", flux=1300.0),
    ], ignore_index=True)
    hist["diaObjectId"] = 1000
    hist.loc[2, "psfFluxErr"] = 50.0
    new = sources([0.02], 0.0, visit=6, mjd=60004.0, band="g", flux=1100.0)
    result = associate(new, obj, history=hist)
    row = result.dia_objects.iloc[0]
    g = np.array([900.0, 1300.0, 1100.0])
    ge = np.array([100.0, 50.0, 100.0])
    w = 1 / ge**2
    assert row["nDiaSources"] == 4
    assert row["g_psfFluxNdata"] == 3 and row["r_psfFluxNdata"] == 1
    assert row["u_psfFluxNdata"] == 0 and np.isnan(row["u_psfFluxMean"])
    assert row["g_psfFluxMean"] == pytest.approx(np.sum(w * g) / np.sum(w), rel=1e-6)
    assert row["g_psfFluxMeanErr"] == pytest.approx(1 / np.sqrt(np.sum(w)), rel=1e-6)
    assert row["g_psfFluxSigma"] == pytest.approx(np.std(g, ddof=1), rel=1e-6)
    assert row["g_psfFluxMin"] == 900.0 and row["g_psfFluxMax"] == 1300.0
    assert row["g_psfFluxErrMean"] == pytest.approx(ge.mean(), rel=1e-6)
    # Slopes between consecutive g epochs: +400/2 d and -200/2 d.
    assert row["g_psfFluxMaxSlope"] == pytest.approx(200.0, rel=1e-6)
    assert row["r_psfFluxMean"] == pytest.approx(500.0) and np.isnan(row["r_psfFluxSigma"])
    assert row["firstDiaSourceMjdTai"] == 60000.0 and row["lastDiaSourceMjdTai"] == 60004.0


def test_history_read_only_for_the_objects_a_visit_updates():
    # Two objects, one of them hit: a reader function is asked once, for that one only, and
    # the result is the one the whole history gives.
    obj = objects([0.0, 30.0])
    hist = pd.concat([sources([0.0], 0.0, visit=3, mjd=60000.0, flux=900.0),
                      sources([30.0], 0.0, visit=3, mjd=60000.0, flux=700.0, first_id=7)],
                     ignore_index=True)
    hist["diaObjectId"] = [1000, 1001]
    new = sources([0.02], 0.0, visit=6, mjd=60004.0)
    asked = []

    def read(ids):
        asked.append(list(ids))
        return hist[hist["diaObjectId"].isin(ids)]

    lazy = associate(new, obj, history=read)
    whole = associate(new, obj, history=hist)
    assert asked == [[1000]]
    pd.testing.assert_frame_equal(lazy.dia_objects, whole.dia_objects)
    assert lazy.history["diaObjectId"].tolist() == whole.history["diaObjectId"].tolist() == [1000]


def test_many_sources_match_their_true_objects():
    rng = np.random.default_rng(3)
    n_obj = 20_000
    obj = objects(rng.uniform(0, 3600, n_obj), rng.uniform(0, 3600, n_obj))
    pick = rng.choice(n_obj, 5000, replace=False)
    src = sources((obj["ra"].to_numpy()[pick] - RA0) * np.cos(np.radians(DEC0)) / ARCSEC
                  + rng.normal(0, 0.1, 5000),
                  (obj["dec"].to_numpy()[pick] - DEC0) / ARCSEC + rng.normal(0, 0.1, 5000))
    result = associate(src, obj, history=None)
    truth = obj["diaObjectId"].to_numpy()[pick]
    got = result.dia_sources["diaObjectId"].to_numpy(np.int64)
    # 5.6 objects/arcmin^2 put a second object within 1" of ~0.5% of the sources.
    assert (got == truth).mean() > 0.997
    assert result.counts["numUnassociatedDiaObjects"] == n_obj - result.counts[
        "numUpdatedDiaObjects"]


def test_bad_objects_table_is_an_input_error():
    with pytest.raises(InputError, match=r"lacks DiaObject column\(s\) \['dec'\]"):
        associate(sources([0.0], 0.0), objects([0.0]).drop(columns="dec"), history=None)
    twice = pd.concat([objects([0.0]), objects([0.0])])
    with pytest.raises(InputError, match="duplicate diaObjectId"):
        associate(sources([0.0], 0.0), twice, history=None)
