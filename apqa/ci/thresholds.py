"""The thresholds file of ``apqa gate``.

Format (YAML)::

    thresholds:
      - metric: apqa.completeness.snr50
        op: "<="            # one of < <= > >= ==
        value: 6
        unit: ""            # optional; any astropy unit convertible to the metric's
        tags: {fake_class: isolated}   # optional; selects measurements having these tags

A threshold applies to every measurement of its metric whose tags include all of its ``tags``;
it fails when one of them violates it or when there is none.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from apqa.errors import ApqaError, ConfigError
from apqa.metrics.registry import convert, get_metric, parse_unit, unit_to_str

OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq}
_KEYS = {"metric", "op", "value", "unit", "tags"}


@dataclass(frozen=True)
class Threshold:
    """One absolute threshold: ``value_of(metric) op value`` in ``unit``."""

    metric: str
    op: str
    value: float
    unit: str
    tags: Mapping[str, str] = field(default_factory=dict)
    source: str = ""

    def selects(self, tags: Mapping[str, str]) -> bool:
        """Whether a measurement with ``tags`` is subject to this threshold."""
        return all(tags.get(k) == v for k, v in self.tags.items())

    def holds(self, value: float, unit: str) -> bool:
        """Whether ``value`` (in ``unit``) satisfies the threshold (NaN never does)."""
        factor = float(parse_unit(unit).to(parse_unit(self.unit)))
        return bool(OPS[self.op](value * factor, self.value))

    @property
    def text(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.op} {self.value:g}{unit}"


def _parse_entry(entry: object, where: str) -> Threshold:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a mapping with metric, op, value, got {entry!r}")
    unknown = set(entry) - _KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; allowed {sorted(_KEYS)}")
    for key in ("metric", "op", "value"):
        if key not in entry:
            raise ConfigError(f"{where}: {key!r} is required")
    metric = str(entry["metric"])
    try:
        definition = get_metric(metric)
    except ApqaError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    op = str(entry["op"])
    if op not in OPS:
        raise ConfigError(f"{where}: op {op!r} is not one of {' '.join(OPS)}")
    value = entry["value"]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: value must be a number, got {value!r}")
    unit = entry.get("unit")
    unit = definition.unit_str if unit is None else str(unit)
    try:
        convert(1.0, unit, metric)
    except ApqaError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    tags = entry.get("tags") or {}
    if not isinstance(tags, Mapping):
        raise ConfigError(f"{where}: tags must be a mapping, got {tags!r}")
    return Threshold(metric, op, float(value), unit_to_str(parse_unit(unit)),
                     {str(k): str(v) for k, v in tags.items()}, where)


def load_thresholds(path: str | Path) -> list[Threshold]:
    """Read and validate a thresholds file; errors name the file, the entry and the field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: thresholds file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("thresholds"), list):
        raise ConfigError(f"{path}: expected a list under 'thresholds:'")
    return [_parse_entry(entry, f"{path}: thresholds[{i}] ({entry.get('metric', '?')})"
                         if isinstance(entry, Mapping) else f"{path}: thresholds[{i}]")
            for i, entry in enumerate(data["thresholds"])]
