"""Association of a visit's DiaSources with DiaObjects: a global one-to-one assignment.

The cost of pairing source *s* with object *o* is Rubin's positional likelihood::

    0.5 * (dra**2 / sra**2 + ddec**2 / sdec**2) + 0.5 * ln(sra**2 * sdec**2)

with ``dra = (ra_s - ra_o) cos(dec_o)``, ``ddec = dec_s - dec_o`` (arcsec) and ``sra**2``,
``sdec**2`` the source's and the object's errors added in quadrature, each error at least the
floor (0.05") and the fallback (0.2") where missing. Only pairs within the radius (1") are
candidates (found with a KD-tree on unit vectors). Each source also gets a private "no match"
column whose cost exceeds any chain of pair costs, so the assignment pairs as many sources as the
one-to-one constraint allows and, among those assignments, minimizes the total cost
(``scipy.sparse.csgraph.min_weight_full_bipartite_matching``). Pairs that are each other's only
candidate are assigned directly; only the ambiguous rest goes to the solver.

Unmatched sources create new DiaObjects (id = the source's diaSourceId, Rubin's convention) when
they pass the configured flag and reliability filters; sources with an ``ssObjectId`` (known solar
system objects) are left out of association and keep their ``ssObjectId``.

Examples
--------
>>> result = associate(dia_sources, dia_objects, history=dia_source_history)  # doctest: +SKIP
>>> result.counts["numNewDiaObjects"]                                         # doctest: +SKIP
12
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from pydantic import Field
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from scipy.spatial import cKDTree

from apqa.config import ConfigModel
from apqa.datamodel.apdb_schema import conform, empty_table, load_apdb_schema
from apqa.errors import InputError
from apqa.pipeline.associate_summary import summarize

ARCSEC = 1.0 / 3600.0
_K_NEAREST = 8


class AssociationConfig(ConfigModel):
    """Association settings (angles in arcsec)."""

    radius: float = Field(1.0, gt=0, description="Largest source-object separation (arcsec).")
    sigma_floor: float = Field(0.05, gt=0, description="Smallest positional error (arcsec).")
    sigma_fallback: float = Field(0.2, gt=0, description="Error used when missing (arcsec).")
    new_object_min_reliability: float | None = Field(
        None, ge=0, le=1, description="Unmatched sources below this reliability make no "
        "new DiaObject (None: no cut).")
    new_object_reject_flags: list[str] = Field(
        default_factory=lambda: ["pixelFlags_nodataCenter", "pixelFlags_offimage"],
        description="DiaSource flag columns; an unmatched source with any set makes no new "
        "DiaObject.")


@dataclass
class AssociationResult:
    """What :func:`associate` returns.

    Attributes
    ----------
    dia_sources
        The input DiaSources (apdb.yaml columns) with ``diaObjectId`` set where associated or
        used to create a new object; null for solar-system and filtered-out sources.
    dia_objects
        The DiaObjects this visit updated or created, with recomputed summaries and
        ``validityStartMjdTai`` = the visit midpoint: what :meth:`Apdb.store_visit` stores.
    counts
        ``numDiaSources``, ``numAssociatedDiaSources`` (to existing objects),
        ``numNewDiaObjects``, ``numUpdatedDiaObjects``, ``numUnassociatedDiaObjects`` (input
        objects with no new source), ``fracUpdatedDiaObjects`` (updated / input objects),
        ``numSsSources`` (skipped, known solar-system) and ``numFilteredDiaSources``
        (unmatched and rejected by the new-object filters).
    input_objects
        The ``dia_objects`` given to :func:`associate` (see :attr:`footprint_objects`).
    history
        The earlier DiaSources of the objects this visit updated (what their alerts carry).
    """

    dia_sources: pd.DataFrame
    dia_objects: pd.DataFrame
    counts: dict[str, float] = field(default_factory=dict)
    input_objects: pd.DataFrame | None = field(default=None, repr=False)
    history: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def footprint_objects(self) -> pd.DataFrame:
        """Every DiaObject of the footprint after this visit: the updated and new ones plus the
        input objects that got no source (what forced photometry measures)."""
        if self.input_objects is None or not len(self.input_objects):
            return self.dia_objects
        kept = self.input_objects[~self.input_objects["diaObjectId"].isin(
            self.dia_objects["diaObjectId"])]
        if not len(kept):
            return self.dia_objects
        return pd.concat([self.dia_objects, conform(kept, "DiaObject", source="associate")],
                         ignore_index=True)


def _unit_vectors(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    r, d = np.radians(ra), np.radians(dec)
    return np.column_stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)])


def candidate_pairs(src_ra: np.ndarray, src_dec: np.ndarray, obj_ra: np.ndarray,
                    obj_dec: np.ndarray, radius_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """All (source index, object index) pairs closer than ``radius_deg``."""
    if src_ra.size == 0 or obj_ra.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    chord = 2.0 * np.sin(np.radians(radius_deg) / 2.0)
    tree = cKDTree(_unit_vectors(obj_ra, obj_dec), balanced_tree=False, compact_nodes=False)
    points = _unit_vectors(src_ra, src_dec)
    k = min(_K_NEAREST, obj_ra.size)
    dist, idx = tree.query(points, k=k, distance_upper_bound=chord)
    dist, idx = dist.reshape(len(points), k), idx.reshape(len(points), k)
    full = np.isfinite(dist[:, -1])  # possibly more than k candidates: ask for all of them
    keep = np.isfinite(dist) & ~full[:, None]
    rows, cols = [np.nonzero(keep)[0]], [idx[keep]]
    for i in np.flatnonzero(full).tolist():
        found = tree.query_ball_point(points[i], chord)
        rows.append(np.full(len(found), i))
        cols.append(np.asarray(found, np.int64))
    return np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64)


def pair_costs(src: pd.DataFrame, obj: pd.DataFrame, si: np.ndarray, oj: np.ndarray,
               config: AssociationConfig) -> np.ndarray:
    """Rubin's positional likelihood cost of each candidate pair (see the module doc)."""
    def errors(frame: pd.DataFrame, col: str, index: np.ndarray) -> np.ndarray:
        if col not in frame.columns:
            return np.full(index.size, config.sigma_fallback)
        sig = frame[col].to_numpy(np.float64, na_value=np.nan)[index] / ARCSEC
        return np.where(np.isfinite(sig), np.maximum(sig, config.sigma_floor),
                        config.sigma_fallback)

    dec_o = obj["dec"].to_numpy(np.float64)[oj]
    dra = (src["ra"].to_numpy(np.float64)[si] - obj["ra"].to_numpy(np.float64)[oj] + 180.0
           ) % 360.0 - 180.0
    dra *= np.cos(np.radians(dec_o)) / ARCSEC
    ddec = (src["dec"].to_numpy(np.float64)[si] - dec_o) / ARCSEC
    sra2 = errors(src, "raErr", si) ** 2 + errors(obj, "raErr", oj) ** 2
    sdec2 = errors(src, "decErr", si) ** 2 + errors(obj, "decErr", oj) ** 2
    return 0.5 * (dra**2 / sra2 + ddec**2 / sdec2) + 0.5 * np.log(sra2 * sdec2)


def assign(si: np.ndarray, oj: np.ndarray, cost: np.ndarray, n_src: int) -> np.ndarray:
    """Global one-to-one assignment; returns each source's object index or -1."""
    match = np.full(n_src, -1, np.int64)
    if si.size == 0:
        return match
    deg_s = np.bincount(si, minlength=n_src)
    deg_o = np.bincount(oj)
    alone = (deg_s[si] == 1) & (deg_o[oj] == 1)
    match[si[alone]] = oj[alone]
    si, oj, cost = si[~alone], oj[~alone], cost[~alone]
    if si.size == 0:
        return match
    rows, r = np.unique(si, return_inverse=True)
    cols, c = np.unique(oj, return_inverse=True)
    n, m = rows.size, cols.size
    # Positive weights (explicit entries are the edges); the no-match cost beats any chain.
    w = cost - cost.min() + 1.0
    no_match = (w.size + 1) * (w.max() + 1.0)
    graph = csr_matrix((np.concatenate([w, np.full(n, no_match)]),
                        (np.concatenate([r, np.arange(n)]), np.concatenate([c, m + np.arange(n)]))),
                       shape=(n, m + n))
    row_ind, col_ind = min_weight_full_bipartite_matching(graph)
    paired = col_ind < m
    match[rows[row_ind[paired]]] = cols[col_ind[paired]]
    return match


def _new_object_ok(src: pd.DataFrame, config: AssociationConfig) -> np.ndarray:
    ok = np.ones(len(src), bool)
    for flag in config.new_object_reject_flags:
        if flag not in src.columns:
            raise InputError(f"association config: new_object_reject_flags names {flag!r}, "
                             "which is not a DiaSource column")
        ok &= ~src[flag].fillna(False).to_numpy(bool)
    if config.new_object_min_reliability is not None:
        rel = src["reliability"].to_numpy(np.float64, na_value=np.nan)
        ok &= rel >= config.new_object_min_reliability
    return ok


def _check_objects(objects: pd.DataFrame) -> None:
    missing = [c for c in ("diaObjectId", "ra", "dec") if c not in objects.columns]
    if missing:
        raise InputError(f"associate: dia_objects lacks DiaObject column(s) {missing}")
    if objects["diaObjectId"].duplicated().any():
        raise InputError("associate: dia_objects has duplicate diaObjectId values; pass one "
                         "version per object (Apdb.read_region does)")


def associate(dia_sources: pd.DataFrame, dia_objects: pd.DataFrame,
              config: AssociationConfig | None = None, *,
              history: pd.DataFrame | Callable[[np.ndarray], pd.DataFrame] | None
              ) -> AssociationResult:
    """Associate one visit-detector's DiaSources with the DiaObjects of its footprint.

    Parameters
    ----------
    dia_sources
        The new DiaSources (apdb.yaml DiaSource columns, one visit).
    dia_objects
        Current DiaObjects in the footprint (e.g. from :meth:`Apdb.read_region`).
    config
        :class:`AssociationConfig`; defaults to Rubin's radius, floor and fallback.
    history
        Earlier DiaSources of ``dia_objects`` (the second table :meth:`Apdb.read_region`
        returns), from which updated objects' summaries are recomputed (Rubin recomputes from
        the DiaSources it loads, too); or a function that reads them for the given object ids,
        called once with the objects this visit updates (``Apdb.read_sources``: a footprint's
        history is mostly of objects a visit does not touch). Required, so that nobody
        forgets it: None states that there are none, and then only the new sources enter the
        summaries. :attr:`AssociationResult.history` holds the updated objects' part.

    Returns
    -------
    AssociationResult
    """
    config = config or AssociationConfig()
    src = conform(dia_sources, "DiaSource", source="associate dia_sources")
    _check_objects(dia_objects)
    objects = dia_objects.reset_index(drop=True)
    is_ss = src["ssObjectId"].notna().to_numpy()
    todo = np.flatnonzero(~is_ss)
    si, oj = candidate_pairs(src["ra"].to_numpy(np.float64)[todo],
                             src["dec"].to_numpy(np.float64)[todo],
                             objects["ra"].to_numpy(np.float64),
                             objects["dec"].to_numpy(np.float64), config.radius * ARCSEC)
    cost = pair_costs(src, objects, todo[si], oj, config)
    match = assign(si, oj, cost, todo.size)
    object_ids = objects["diaObjectId"].to_numpy(np.int64)
    dia_object_id = np.full(len(src), -1, np.int64)
    matched = match >= 0
    dia_object_id[todo[matched]] = object_ids[match[matched]]
    unmatched = todo[~matched]
    creates = unmatched[_new_object_ok(src.iloc[unmatched], config)]
    dia_object_id[creates] = src["diaSourceId"].to_numpy(np.int64)[creates]
    src["diaObjectId"] = pd.array(np.where(dia_object_id >= 0, dia_object_id, 0),
                                  dtype="Int64")
    src.loc[dia_object_id < 0, "diaObjectId"] = pd.NA

    updated_ids = np.unique(object_ids[match[matched]])
    if callable(history):
        history = history(updated_ids)
    if history is not None and len(history):
        history = history[history["diaObjectId"].isin(updated_ids)].reset_index(drop=True)
    new_objects = _summaries(src, objects, history, config)
    n_in = len(objects)
    counts = {
        "numDiaSources": len(src),
        "numAssociatedDiaSources": int(matched.sum()),
        "numNewDiaObjects": int(creates.size),
        "numUpdatedDiaObjects": int(updated_ids.size),
        "numUnassociatedDiaObjects": int(n_in - updated_ids.size),
        "fracUpdatedDiaObjects": float(updated_ids.size / n_in) if n_in else float("nan"),
        "numSsSources": int(is_ss.sum()),
        "numFilteredDiaSources": int(unmatched.size - creates.size),
    }
    return AssociationResult(src, new_objects, counts, objects, history)


def _summaries(src: pd.DataFrame, objects: pd.DataFrame, history: pd.DataFrame | None,
               config: AssociationConfig) -> pd.DataFrame:
    """Updated and new DiaObjects: earlier columns kept, summaries recomputed."""
    linked = src[src["diaObjectId"].notna()]
    touched = linked["diaObjectId"].to_numpy(np.int64)
    parts = [linked]
    if history is not None and len(history):
        ids = history["diaObjectId"].to_numpy(np.int64, na_value=-1)
        keep = np.isin(ids, touched) & ~history["diaSourceId"].isin(linked["diaSourceId"])
        parts.append(history[keep])
    cols = ["diaObjectId", "midpointMjdTai", "ra", "dec", "raErr", "decErr", "band",
            "psfFlux", "psfFluxErr", "scienceFlux", "scienceFluxErr"]
    sources = pd.concat([p[cols] for p in parts], ignore_index=True)
    summary = summarize(sources, config.sigma_floor * ARCSEC, config.sigma_fallback * ARCSEC)
    earlier = objects[objects["diaObjectId"].isin(summary.index)]
    earlier = conform(earlier, "DiaObject", source="associate dia_objects") if len(
        earlier) else empty_table("DiaObject")
    fresh = empty_table("DiaObject", int(len(summary) - len(earlier)))
    fresh["diaObjectId"] = summary.index.difference(pd.Index(earlier["diaObjectId"])).to_numpy()
    base = (pd.concat([earlier, fresh], ignore_index=True).set_index("diaObjectId", drop=False)
            .loc[summary.index].reset_index(drop=True))
    n = len(base)
    # The table is built from its columns at once: assigning ~150 columns one by one into
    # ``base`` cost more than the summaries themselves.
    columns = {}
    for col in load_apdb_schema()["DiaObject"].columns:
        if col.name in summary.columns:
            columns[col.name] = summary[col.name].to_numpy()
        elif "_psfFlux" in col.name or "_scienceFlux" in col.name:
            columns[col.name] = np.zeros(n, np.int64) if col.name.endswith("Ndata") else \
                np.full(n, np.nan)
        else:
            columns[col.name] = base[col.name].to_numpy()
    columns["ra_dec_Cov"] = np.full(n, np.nan)  # not computed: an earlier value would be stale
    columns["validityStartMjdTai"] = np.full(n, float(src["midpointMjdTai"].max()))
    columns["validityEndMjdTai"] = np.full(n, np.nan)
    return conform(pd.DataFrame(columns), "DiaObject", source="associate")
