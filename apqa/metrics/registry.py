"""The metric registry: every apqa metric declared once, and the :class:`Measurement` value type.

A metric has a fully qualified name ``apqa.<family>.<name>`` (three dot-separated parts, so that
it maps onto lsst.verify's ``package.metric`` names), an astropy unit, a description, the
direction in which it gets better and the pipeline stage it belongs to. A :class:`Measurement`
of an undeclared metric, or in a unit that does not convert to the declared one, is an error.

Examples
--------
>>> from apqa.metrics.registry import Measurement, get_metric
>>> get_metric("apqa.completeness.m50").unit
Unit("mag")
>>> m = Measurement("apqa.completeness.m50", 24.1, uncertainty=0.02, tags={"band": "g"})
>>> m.quantity
<Quantity 24.1 mag>
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache

import astropy.units as u

from apqa.errors import InputError

BETTER = ("higher", "lower", "zero", "one", "none")
"""Directions: a larger value is better, a smaller one, closer to 0, closer to 1, or neither."""

_DIMLESS = u.dimensionless_unscaled


@dataclass(frozen=True)
class MetricDef:
    """One declared metric."""

    name: str
    unit: u.UnitBase
    description: str
    better: str
    stage: str

    @property
    def unit_str(self) -> str:
        return unit_to_str(self.unit)

    def worsening(self, new: float, old: float) -> float:
        """How much worse ``new`` is than ``old`` in this metric's direction (negative when it is
        better, 0 for metrics without a direction); for 'zero' and 'one' the change of the
        distance to the target."""
        if self.better == "higher":
            return old - new
        if self.better == "lower":
            return new - old
        if self.better == "zero":
            return abs(new) - abs(old)
        if self.better == "one":
            return abs(new - 1) - abs(old - 1)
        return 0.0


# name, unit, better, stage, description. Tags a metric is broken down by are named in its
# description; per-exposure metrics also come with visit="all", detector="all" for the run.
_DECLARATIONS: tuple[tuple[str, u.UnitBase, str, str, str], ...] = (
    ("apqa.completeness.snr50", _DIMLESS, "lower", "detection",
     "True S/N at which the fitted logistic completeness curve reaches half its plateau "
     "(tags fake_class, host_sb); uncertainty from a bootstrap"),
    ("apqa.completeness.snr50Width", _DIMLESS, "lower", "detection",
     "Width (S/N) of the fitted logistic completeness curve; bootstrap uncertainty"),
    ("apqa.completeness.plateau", _DIMLESS, "higher", "detection",
     "Plateau (high-S/N completeness) of the logistic fit against S/N; bootstrap uncertainty"),
    ("apqa.completeness.m50", u.mag, "higher", "detection",
     "AB magnitude at which the fitted logistic completeness curve reaches half its plateau"),
    ("apqa.completeness.m50Width", u.mag, "lower", "detection",
     "Width (mag) of the fitted logistic completeness curve against magnitude"),
    ("apqa.completeness.fraction_snr10", _DIMLESS, "higher", "detection",
     "Fraction of fakes with true S/N in [10, 20) that were detected; Wilson 68% half-width"),
    ("apqa.completeness.fractionInSnrBin", _DIMLESS, "higher", "detection",
     "Detected fraction of fakes in Rubin's true-S/N bins (tag snr_bin); Wilson 68% half-width"),
    ("apqa.completeness.fractionInMagBin", _DIMLESS, "higher", "detection",
     "Detected fraction of fakes in Rubin's magnitude bins (tag mag_bin); Wilson half-width"),
    ("apqa.completeness.nFakes", u.ct, "none", "injection",
     "Number of injected fakes used for completeness (injection_flag == 0)"),
    ("apqa.injection.flaggedFraction", _DIMLESS, "lower", "injection",
     "Fraction of catalog fakes whose injection was flagged (injection_flag != 0)"),
    ("apqa.photometry.psfFluxBias", _DIMLESS, "zero", "measurement",
     "Median fractional psfFlux bias (psfFlux - truth_flux) / truth_flux of matched fakes "
     "(tag snr_bin; '10-inf' is every fake with true S/N >= 10)"),
    ("apqa.photometry.psfFluxPullMedian", _DIMLESS, "zero", "measurement",
     "Median of (psfFlux - truth_flux) / psfFluxErr of matched fakes (tag snr_bin)"),
    ("apqa.photometry.psfFluxPullStd", _DIMLESS, "one", "measurement",
     "Robust std (1.4826 MAD) of (psfFlux - truth_flux) / psfFluxErr (tag snr_bin)"),
    ("apqa.photometry.centroidOffset", u.mas, "lower", "measurement",
     "Median angular offset of matched fakes from their true position (tag snr_bin)"),
    ("apqa.photometry.centroidBiasRa", u.mas, "zero", "measurement",
     "Median RA offset (times cos dec) of matched fakes from truth (tag snr_bin)"),
    ("apqa.photometry.centroidBiasDec", u.mas, "zero", "measurement",
     "Median Dec offset of matched fakes from truth (tag snr_bin)"),
    ("apqa.photometry.centroidScatter", u.mas, "lower", "measurement",
     "Robust std per axis of matched fakes' offsets from truth (tag snr_bin)"),
    ("apqa.diffim.forcedFluxPullStd", _DIMLESS, "one", "diffim",
     "Robust std of (forced_flux - truth_flux) / truth_flux_err over every fake: the "
     "difference-image noise at fake positions over its prediction"),
    ("apqa.diffim.noiseRatio", _DIMLESS, "one", "diffim",
     "Measured over predicted difference-image pixel noise (tags visit, detector)"),
    ("apqa.diffim.residualFootprintRatio", _DIMLESS, "lower", "diffim",
     "Residual flux in the difference image at static sources over their flux "
     "(tags visit, detector)"),
    ("apqa.diffim.templateCoverage", _DIMLESS, "higher", "diffim",
     "Fraction of the science image covered by the template (tags visit, detector)"),
    ("apqa.diffim.numSciSources", u.ct, "none", "diffim",
     "Number of sources detected on the science images (tags visit, detector)"),
    ("apqa.diffim.fracDiaSourcesToSciSources", _DIMLESS, "lower", "diffim",
     "Number of DIASources over the number of science sources (tags visit, detector)"),
    ("apqa.artifacts.falsePositiveDensity", u.deg**-2, "lower", "detection",
     "DIASources not matched to any real source, per square degree; Poisson uncertainty"),
    ("apqa.artifacts.falsePerDetector", u.ct, "lower", "detection",
     "False DIASources per processed visit-detector; Poisson uncertainty"),
    ("apqa.artifacts.dipoleFraction", _DIMLESS, "lower", "detection",
     "Fraction of false DIASources flagged isDipole; Wilson 68% half-width"),
    ("apqa.artifacts.negativeFraction", _DIMLESS, "none", "detection",
     "Fraction of false DIASources that are negative; Wilson 68% half-width"),
    ("apqa.artifacts.nearBrightStarFraction", _DIMLESS, "none", "detection",
     "Fraction of false DIASources within the bright-star radius of a bright star"),
    ("apqa.artifacts.maskedFraction", _DIMLESS, "none", "detection",
     "Fraction of false DIASources whose footprint touches bad, saturated, cosmic-ray, "
     "interpolated, suspect, edge, no-data or streak pixels"),
    ("apqa.artifacts.rocAuc", _DIMLESS, "higher", "detection",
     "Area under the ROC curve of reliability separating real from false DIASources "
     "(Hanley-McNeil uncertainty)"),
    ("apqa.artifacts.fprAtFnr", _DIMLESS, "lower", "detection",
     "False-positive rate of the reliability cut that loses the given fraction of reals "
     "(tag fnr)"),
    ("apqa.artifacts.equalErrorRate", _DIMLESS, "lower", "detection",
     "Reliability cut where the false-positive and false-negative rates are equal"),
    ("apqa.artifacts.purityAtCompleteness", _DIMLESS, "higher", "detection",
     "Fraction of real DIASources above the reliability cut that keeps the given fraction "
     "of reals (tag completeness)"),
    ("apqa.association.numNewDiaObjects", u.ct, "none", "association",
     "DiaObjects created from unassociated DIASources (tag visit; visit='all' is the sum)"),
    ("apqa.association.numUnassociatedDiaObjects", u.ct, "none", "association",
     "DiaObjects in the visit's footprint that got no DIASource (tag visit)"),
    ("apqa.association.fracUpdatedDiaObjects", _DIMLESS, "none", "association",
     "Fraction of the footprint's pre-existing DiaObjects that got a DIASource (tag visit)"),
    ("apqa.association.totalUnassociatedDiaObjects", u.ct, "none", "association",
     "DiaObjects in the APDB with exactly one DIASource"),
    ("apqa.alerts.count", u.ct, "none", "alerts", "Number of alerts written"),
    ("apqa.alerts.meanSize", u.byte, "lower", "alerts", "Mean size of one serialized alert"),
    ("apqa.alerts.totalSize", u.byte, "none", "alerts", "Total size of the serialized alerts"),
    ("apqa.calibration.psfFwhm", u.arcsec, "lower", "calibration",
     "PSF FWHM of the calibrated science exposures (tags visit, detector)"),
    ("apqa.calibration.astromScatter", u.mas, "lower", "calibration",
     "Astrometric scatter of reference-matched stars (tags visit, detector)"),
    ("apqa.calibration.zeroPointError", u.mmag, "lower", "calibration",
     "Photometric zero-point error (tags visit, detector)"),
    ("apqa.runtime.wall", u.s, "lower", "runtime", "Wall time of a pipeline stage (tag stage)"),
    ("apqa.runtime.cpu", u.s, "lower", "runtime", "CPU time of a pipeline stage (tag stage)"),
    ("apqa.runtime.peakRss", u.byte, "lower", "runtime",
     "Peak resident memory of a pipeline stage (tag stage)"),
    ("apqa.runtime.wallPerDetector", u.s, "lower", "runtime",
     "Total wall time over the number of processed visit-detectors"),
    ("apqa.runtime.cpuPerDetector", u.s, "lower", "runtime",
     "Total CPU time over the number of processed visit-detectors"),
)


def _build() -> dict[str, MetricDef]:
    registry: dict[str, MetricDef] = {}
    for name, unit, better, stage, description in _DECLARATIONS:
        parts = name.split(".")
        if len(parts) != 3 or parts[0] != "apqa" or "_" in parts[1]:
            raise ValueError(f"metric name {name!r} must look like apqa.<family>.<name>")
        if better not in BETTER or name in registry:
            raise ValueError(f"metric {name!r}: bad direction or declared twice")
        registry[name] = MetricDef(name, unit, description, better, stage)
    return registry


METRICS: dict[str, MetricDef] = _build()
"""Every declared metric by name."""


def get_metric(name: str) -> MetricDef:
    """The declaration of metric ``name``; an unknown name is an :class:`InputError`."""
    try:
        return METRICS[name]
    except KeyError:
        raise InputError(f"unknown metric {name!r} (see `apqa metrics list`)") from None


@cache
def parse_unit(text: str) -> u.UnitBase:
    """An astropy unit from its string form ('' is dimensionless); errors name the text."""
    try:
        return u.Unit(text)
    except ValueError:
        raise InputError(f"unit {text!r} is not an astropy unit") from None


def unit_to_str(unit: u.UnitBase) -> str:
    """The string form stored in databases and files ('' for dimensionless)."""
    return "" if unit == _DIMLESS else unit.to_string()


@cache
def _conversion(unit_text: str, metric: str) -> float:
    """Factor from ``unit_text`` to the metric's unit, or an error naming both."""
    unit = parse_unit(unit_text)
    target = get_metric(metric).unit
    try:
        return float(unit.to(target))
    except u.UnitConversionError:
        raise InputError(
            f"metric {metric!r}: unit {unit_text!r} does not convert to "
            f"{unit_to_str(target)!r}") from None


def convert(value: float, unit: str | u.UnitBase, metric: str) -> float:
    """``value`` in ``unit`` expressed in the declared unit of ``metric``."""
    text = unit if isinstance(unit, str) else unit_to_str(unit)
    return value * _conversion(text, metric)


@dataclass(frozen=True)
class Measurement:
    """A computed value of a declared metric.

    Parameters
    ----------
    metric
        A declared metric name (unknown names raise :class:`InputError`).
    value
        The value in ``unit``.
    unit
        An astropy unit or its string; ``None`` means the metric's declared unit.
    uncertainty
        One-sigma uncertainty in ``unit`` (None when unknown).
    tags
        Breakdown and provenance: dataset, band, visit, detector, algorithm, fake_class, ...
        Values are stored as strings.
    """

    metric: str
    value: float
    unit: str | u.UnitBase | None = None
    uncertainty: float | None = None
    tags: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        definition = get_metric(self.metric)
        unit = definition.unit_str if self.unit is None else self.unit
        text = unit if isinstance(unit, str) else unit_to_str(unit)
        _conversion(text, self.metric)
        object.__setattr__(self, "unit", text)
        object.__setattr__(self, "value", float(self.value))
        if self.uncertainty is not None:
            unc = float(self.uncertainty)
            object.__setattr__(self, "uncertainty", unc if math.isfinite(unc) else None)
        object.__setattr__(self, "tags", {str(k): str(v) for k, v in self.tags.items()})

    @property
    def quantity(self) -> u.Quantity:
        """The value as an astropy Quantity."""
        return self.value * parse_unit(self.unit)

    def in_metric_unit(self) -> tuple[float, float | None]:
        """(value, uncertainty) converted to the metric's declared unit."""
        factor = _conversion(self.unit, self.metric)
        unc = None if self.uncertainty is None else self.uncertainty * factor
        return self.value * factor, unc
