"""Configuration of the survey simulator."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from apqa.config import ConfigModel

DatasetName = Literal["hits-sim", "cosmos-sim", "crowded-sim"]


class SimulationConfig(ConfigModel):
    """What to simulate. YAML keys are these field names; unknown keys are errors.

    Examples
    --------
    >>> SimulationConfig(dataset="cosmos-sim", n_visits=2).n_detectors
    1
    """

    dataset: DatasetName = "hits-sim"
    n_visits: int = Field(4, ge=1, le=500, description="science visits per detector")
    n_detectors: int = Field(1, ge=1, le=62, description="detectors per visit")
    n_template_visits: int = Field(1, ge=1, le=20, description="deep template visits")
    seed: int = Field(0, ge=0, description="master seed; everything is deterministic in it")
    spec_overrides: dict[str, float] = Field(
        default_factory=dict,
        description="numeric dataset parameters to change, e.g. {transient_density: 20000, "
                    "variable_fraction: 0}: a dense sky of transients measures completeness "
                    "against truth, an empty one counts false detections")
    write_noiseless: bool = Field(
        False, description="also write the noiseless expected image (truth/model_*.fits)"
    )
