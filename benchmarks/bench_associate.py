"""Benchmark: association of 100,000 DiaSources against 1,000,000 DiaObjects (issue 7: <= 2 s).

The DiaObjects cover 10 deg^2 (1e5 per deg^2, one earlier DiaSource each as history for the
summaries); half of the new sources sit 0.1" from an object, half are new. The timed call is
``associate()`` with summaries; the data are built before the clock starts. Baselines in the same
session: plain nearest-neighbour matching (cKDTree build + k=1 query, no one-to-one constraint,
no summaries: the floor) and one ``min_weight_full_bipartite_matching`` over all candidate pairs
without apqa's split of unambiguous pairs.

Run:  python benchmarks/bench_associate.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_simulate import SINGLE_CORE

N_SOURCES, N_OBJECTS = 100_000, 1_000_000


def make_data(seed: int = 1):
    from apqa.datamodel.apdb_schema import empty_table

    rng = np.random.default_rng(seed)
    ra = rng.uniform(0.0, 3.3, N_OBJECTS)
    sin_dec = rng.uniform(np.sin(np.radians(-1.5)), np.sin(np.radians(1.5)), N_OBJECTS)
    dec = np.degrees(np.arcsin(sin_dec))
    objects = empty_table("DiaObject", N_OBJECTS)
    objects["diaObjectId"] = np.arange(N_OBJECTS) + 1
    objects["ra"], objects["dec"] = ra, dec
    objects["raErr"] = objects["decErr"] = 0.05 / 3600
    objects["nDiaSources"] = objects["g_psfFluxNdata"] = 1
    history = empty_table("DiaSource", N_OBJECTS)
    history["diaSourceId"] = np.arange(N_OBJECTS) + 10**12
    history["diaObjectId"] = objects["diaObjectId"]
    history["ra"], history["dec"], history["band"] = ra, dec, "g"
    history["midpointMjdTai"], history["psfFlux"], history["psfFluxErr"] = 60000.0, 1e3, 1e2
    known = rng.choice(N_OBJECTS, N_SOURCES // 2, replace=False)
    n_new = N_SOURCES - known.size
    sources = empty_table("DiaSource", N_SOURCES)
    sources["diaSourceId"] = np.arange(N_SOURCES) + 2 * 10**12
    sources["visit"], sources["detector"], sources["band"] = 2, 1, "g"
    sources["midpointMjdTai"] = 60001.0
    sources["ra"] = np.concatenate([ra[known] + rng.normal(0, 0.1 / 3600, known.size),
                                    rng.uniform(0.0, 3.3, n_new)])
    sources["dec"] = np.concatenate([dec[known] + rng.normal(0, 0.1 / 3600, known.size),
                                     rng.uniform(-1.5, 1.5, n_new)])
    sources["raErr"] = sources["decErr"] = 0.1 / 3600
    sources["psfFlux"], sources["psfFluxErr"] = 1.1e3, 1e2
    return sources, objects, history


def worker() -> None:
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching
    from scipy.spatial import cKDTree

    from apqa.pipeline.associate import (
        ARCSEC,
        AssociationConfig,
        _unit_vectors,
        associate,
        candidate_pairs,
        pair_costs,
    )

    sources, objects, history = make_data()
    start = time.perf_counter()
    result = associate(sources, objects, history=history)
    t_ours = time.perf_counter() - start

    start = time.perf_counter()
    tree = cKDTree(_unit_vectors(objects["ra"].to_numpy(), objects["dec"].to_numpy()))
    tree.query(_unit_vectors(sources["ra"].to_numpy(), sources["dec"].to_numpy()), k=1,
               distance_upper_bound=2 * np.sin(np.radians(ARCSEC) / 2))
    t_nn = time.perf_counter() - start

    si, oj = candidate_pairs(sources["ra"].to_numpy(), sources["dec"].to_numpy(),
                             objects["ra"].to_numpy(), objects["dec"].to_numpy(), ARCSEC)
    cost = pair_costs(sources, objects, si, oj, AssociationConfig())
    start = time.perf_counter()
    cols, c = np.unique(oj, return_inverse=True)
    n, m = N_SOURCES, cols.size
    w = cost - cost.min() + 1.0
    rows = np.concatenate([si, np.arange(n)])
    columns = np.concatenate([c, m + np.arange(n)])
    weights = np.concatenate([w, np.full(n, (w.size + 1) * (w.max() + 1))])
    graph = csr_matrix((weights, (rows, columns)), shape=(n, m + n))
    min_weight_full_bipartite_matching(graph)
    t_full = time.perf_counter() - start
    print(json.dumps({"associate_s": t_ours, "nearest_neighbour_s": t_nn,
                      "single_solver_s": t_full, "counts": result.counts}))


def run_worker(script: str, *args: str) -> tuple[dict, float, float]:
    """Run ``script --worker`` on one core under /usr/bin/time -v: (its JSON, wall s, RSS GB)."""
    env = {**os.environ, **SINGLE_CORE}
    cmd = ["/usr/bin/time", "-v", sys.executable, script, "--worker", *args]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", "0", *cmd]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", result.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    seconds = float(wall.group(1) or 0) * 3600 + float(wall.group(2)) * 60 + float(wall.group(3))
    return json.loads(result.stdout.strip().splitlines()[-1]), seconds, int(rss.group(1)) / 1024**2


def main() -> None:
    if "--worker" in sys.argv:
        worker()
        return
    numbers, wall, rss = run_worker(__file__)
    print(f"association of {N_SOURCES:,} DiaSources against {N_OBJECTS:,} DiaObjects")
    print(f"  associate() (with summaries):      {numbers['associate_s']:.2f} s  (target <= 2 s)")
    print(f"  baseline nearest neighbour (floor): {numbers['nearest_neighbour_s']:.2f} s "
          f"-> ratio {numbers['associate_s'] / numbers['nearest_neighbour_s']:.1f}")
    print(f"  baseline one global solver call:    {numbers['single_solver_s']:.2f} s "
          "(solver alone, pairs given)")
    print(f"  whole process (data generation, 3 runs above): {wall:.1f} s, "
          f"peak RSS {rss:.2f} GB")
    print(f"  counts: {numbers['counts']}")


if __name__ == "__main__":
    main()
