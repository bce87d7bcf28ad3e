"""Gate reports for people and CI systems: a rich table, JUnit XML and Markdown."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

from rich.table import Table

from apqa.ci.gate import Check, GateReport


def _value(check: Check) -> str:
    if check.value is None:
        return "-"
    if math.isnan(check.value):
        return "NaN"
    return f"{check.value:.6g}{' ' + check.unit if check.unit else ''}"


def summary(report: GateReport) -> str:
    """One line: verdict, counts, baseline."""
    thresholds = [c for c in report.checks if c.kind == "threshold"]
    failed_t = sum(not c.passed for c in thresholds)
    regressed = sum(c.kind == "regression" for c in report.checks)
    verdict = "PASSED" if report.passed else "FAILED"
    text = (f"gate {verdict} for run {report.run.id} ({report.run.dataset}): "
            f"{len(thresholds) - failed_t}/{len(thresholds)} threshold checks passed")
    if report.baseline is not None:
        text += (f"; vs baseline run {report.baseline.id}: {report.regression_tested} values "
                 f"tested, {regressed} regressed, {report.improved} improved, "
                 f"{report.regression_untested} without an uncertainty")
    if any(c.kind == "run" for c in report.checks):
        text += f"; run status is {report.run.status}"
    return text


def rich_table(report: GateReport) -> Table:
    """Threshold checks and regressions, failures first."""
    table = Table(title=summary(report), title_justify="left")
    for column in ("result", "kind", "metric", "tags", "value", "expected", "detail"):
        table.add_column(column, overflow="fold")
    for check in sorted(report.checks, key=lambda c: c.passed):
        result = "[green]pass[/green]" if check.passed else "[bold red]FAIL[/bold red]"
        table.add_row(result, check.kind, check.metric, check.tag_text, _value(check),
                      check.expected, check.detail)
    return table


def write_junit(report: GateReport, path: str | Path) -> None:
    """JUnit XML: one testcase per check, a ``failure`` element for each failing one."""
    suites = ET.Element("testsuites")
    suite = ET.SubElement(suites, "testsuite", name="apqa.gate", tests=str(len(report.checks)),
                          failures=str(len(report.failures)), errors="0", skipped="0")
    properties = ET.SubElement(suite, "properties")
    ET.SubElement(properties, "property", name="run", value=str(report.run.id))
    ET.SubElement(properties, "property", name="dataset", value=report.run.dataset)
    if report.baseline is not None:
        ET.SubElement(properties, "property", name="baseline", value=str(report.baseline.id))
    for check in report.checks:
        case = ET.SubElement(suite, "testcase", classname=f"apqa.gate.{check.kind}",
                             name=check.name)
        if not check.passed:
            failure = ET.SubElement(case, "failure",
                                    message=f"{check.metric} = {_value(check)}: {check.detail}")
            failure.text = f"{check.name}\nvalue: {_value(check)}\n{check.detail}"
    for note in report.notes:
        ET.SubElement(suite, "system-out").text = note
    ET.indent(suites)
    Path(path).write_text(ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n")


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(report: GateReport) -> str:
    """A Markdown summary for pull-request comments: verdict, failures, then passing checks."""
    icon = "✅" if report.passed else "❌"
    lines = [f"### {icon} apqa gate", "", summary(report), ""]
    lines += [f"> {note}" for note in report.notes]
    lines += ["", "| result | kind | metric | tags | value | expected | detail |",
              "|---|---|---|---|---|---|---|"]
    for check in sorted(report.checks, key=lambda c: c.passed):
        result = "pass" if check.passed else "**FAIL**"
        lines.append("| " + " | ".join(_md(x) for x in (
            result, check.kind, f"`{check.metric}`", check.tag_text, _value(check),
            check.expected, check.detail)) + " |")
    return "\n".join(lines) + "\n"
