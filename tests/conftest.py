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
