"""Shared fixtures: simulated exposures are costly (~1-2 s), so they are built once per session."""

from __future__ import annotations

import pytest

from apqa.sim import SimulationConfig, SurveySimulator


@pytest.fixture(scope="session")
def hits_sim() -> SurveySimulator:
    """A one-detector hits-sim survey with two science visits and one template."""
    return SurveySimulator(SimulationConfig(dataset="hits-sim", n_visits=2, seed=11))


@pytest.fixture(scope="session")
def hits_exposure(hits_sim):
    """The first science visit of :func:`hits_sim`, detector 1."""
    return hits_sim.exposure(410001, 1)


def _process(dataset: str, seed: int):
    from apqa.pipeline.single_visit import process_exposure

    sim = SurveySimulator(SimulationConfig(dataset=dataset, n_visits=1, seed=seed))
    visit = sim.plans[-1].visit
    truth = sim.exposure(visit, 1)
    bias, flat = sim.calib_exposures(1)
    result = process_exposure(truth.raw, bias, flat, sim.calibration(1).defects, sim.refcat)
    return sim, truth, result


@pytest.fixture(scope="session")
def processed_hits():
    """(simulator, simulated exposure with truth, single-visit result) for hits-sim."""
    return _process("hits-sim", 21)


@pytest.fixture(scope="session")
def processed_cosmos():
    return _process("cosmos-sim", 22)


@pytest.fixture(scope="session")
def processed_crowded():
    return _process("crowded-sim", 23)
