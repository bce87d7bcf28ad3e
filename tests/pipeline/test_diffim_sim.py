"""Differencing on the simulator: calibrated science and template visits, warped and subtracted;
transients recovered with their true fluxes (AL and ZOGY agree), noise as predicted."""

from __future__ import annotations

import numpy as np
import pytest

from apqa.pipeline.diffim.subtract import DiffConfig, subtract
from apqa.pipeline.photometry import psf_flux
from apqa.pipeline.single_visit import process_exposure
from apqa.sim import SimulationConfig, SurveySimulator


@pytest.fixture(scope="module")
def calexps():
    sim = SurveySimulator(SimulationConfig(dataset="hits-sim", n_visits=1, seed=31))
    bias, flat = sim.calib_exposures(1)
    defects = sim.calibration(1).defects
    out = {}
    for plan in sim.plans:
        truth = sim.exposure(plan.visit, 1)
        result = process_exposure(truth.raw, bias, flat, defects, sim.refcat)
        out["template" if plan.is_template else "science"] = (truth, result.calexp)
    return out


@pytest.fixture(scope="module", params=["al", "zogy"])
def difference(request, calexps):
    (_, science), (_, template) = calexps["science"], calexps["template"]
    result, _ = subtract(science, template, DiffConfig(algorithm=request.param))
    return request.param, result


def test_noise_ratio_on_simulated_visits(difference):
    _, result = difference
    assert result.quality["template_coverage"] > 0.9
    assert result.quality["noise_ratio"] == pytest.approx(1.0, abs=0.05)


def _point_sources(truth, diff, min_snr=20):
    """Truth point sources whose flux changed between the epochs, with their true change."""
    ts = truth.truth_sources
    pts = ts[ts["kind"].isin(["transient"]) & ts["in_image"]]
    x, y = pts["x"].to_numpy(), pts["y"].to_numpy()
    keep = (x > 50) & (x < diff.width - 50) & (y > 50) & (y < diff.height - 50)
    return x[keep], y[keep], pts["flux_njy"].to_numpy()[keep]


def test_transients_recovered(difference, calexps):
    _, result = difference
    truth, _ = calexps["science"]
    diff = result.difference
    x, y, flux_njy = _point_sources(truth, diff)
    assert x.size > 0, "this seed's field must hold a transient"
    flux, err, _, _ = psf_flux(diff.image, diff.variance, ~diff.mask.is_set(["NO_DATA", "SAT"]),
                               diff.psf, x, y)
    measured = diff.photo_calib.to_njy(flux)
    pull = (measured - flux_njy) / diff.photo_calib.to_njy(err)
    assert np.all(np.abs(pull) < 5), pull
