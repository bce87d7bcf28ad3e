"""CI metric gates: thresholds files, the statistical regression test and gate reports.

Examples
--------
>>> from apqa.ci import evaluate_gate, load_thresholds  # doctest: +SKIP
>>> report = evaluate_gate(MetricStore(), "latest", load_thresholds("ci/thresholds.yaml"),
...                        baseline="latest-main")  # doctest: +SKIP
>>> report.passed  # doctest: +SKIP
True
"""

from apqa.ci.gate import Check, GateReport, evaluate_gate
from apqa.ci.thresholds import Threshold, load_thresholds

__all__ = ["Check", "GateReport", "Threshold", "evaluate_gate", "load_thresholds"]
