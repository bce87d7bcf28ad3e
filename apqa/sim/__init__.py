"""GalSim survey simulator: the embedded datasets, with truth.

This package never imports :mod:`apqa.pipeline` or :mod:`apqa.injection`: the truth must not
come from the code it judges.
"""

from apqa.sim.config import SimulationConfig
from apqa.sim.datasets import DATASETS, DatasetSpec, get_dataset
from apqa.sim.exposure import SimulatedExposure
from apqa.sim.survey import SurveySimulator, load_manifest

__all__ = ["DATASETS", "DatasetSpec", "SimulatedExposure", "SimulationConfig", "SurveySimulator",
           "get_dataset", "load_manifest"]
