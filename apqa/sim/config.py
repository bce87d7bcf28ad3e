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
    transient_density: float | None = Field(
        None, ge=0, description="transients per deg^2 (default: the dataset's); a dense sky of "
                                "transients measures detection completeness against truth")
    transient_mag_range: tuple[float, float] | None = Field(
        None, description="peak AB magnitude range of transients (default: the dataset's)")
    write_noiseless: bool = Field(
        False, description="also write the noiseless expected image (truth/model_*.fits)"
    )
