"""Checks of the operations kit in deploy/: Prometheus config, rules, alerts, dashboard.

promtool (from Debian's prometheus package) validates the config and the rule files, runs
the rule unit tests in deploy/tests/, and parses every PromQL expression of the Grafana
dashboard after its variables are replaced by sample values.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from collector.collector import SELF_METRIC_NAMES
from collector.definitions import APPLICATION_METRICS, WRITER_METRICS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "s3proxy.json"
RUNBOOK = ROOT / "docs" / "runbook.md"
METRICS_DOC = ROOT / "docs" / "metrics.md"

# Families the rules use that no code records yet.
PLANNED_FAMILIES: frozenset[str] = frozenset()

# Sample values for Grafana's variables, chosen so that the expression stays valid PromQL.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$backend": ".*",
    "$operation": ".*",
}

_RECORDED_NAME = re.compile(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b")
_FAMILY_NAME = re.compile(r"\bs3proxy_[a-z0-9_]+\b")
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in _load_yaml(path)["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Yield every panel, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboard_expressions() -> list[str]:
    """Return every PromQL expression of the dashboard, variables replaced."""
    dashboard = _dashboard()
    expressions = [
        target["expr"]
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = _LABEL_VALUES.match(variable["definition"])
        assert match is not None, f"variable {variable['name']} is not a label_values() query"
        expressions.append(match["selector"])

    replaced = []
    for expression in expressions:
        for variable, value in GRAFANA_VARIABLES.items():
            expression = expression.replace(variable, value)
        replaced.append(expression)
    return replaced


def _all_expressions() -> list[str]:
    rules = _rules(DEPLOY / "rules.yml") + _rules(DEPLOY / "alerts.yml")
    return [rule["expr"] for rule in rules] + _dashboard_expressions()


def _github_anchor(heading: str) -> str:
    anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return anchor.replace(" ", "-")


def _alert_tests() -> list[dict[str, Any]]:
    cases = []
    for path in sorted((DEPLOY / "tests").glob("*.yml")):
        for group in _load_yaml(path)["tests"]:
            cases.extend(group.get("alert_rule_test", []))
    return cases


def test_prometheus_config_valid(promtool: str) -> None:
    """promtool accepts prometheus.yml together with the rule files it names."""
    result = _run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_loads_rules() -> None:
    """prometheus.yml loads both the recording rules and the alerts."""
    config = _load_yaml(DEPLOY / "prometheus.yml")
    assert sorted(config["rule_files"]) == ["alerts.yml", "rules.yml"]


def test_prometheus_scrapes_one_job() -> None:
    """Only the exporter's job is scraped, so no request is counted twice."""
    config = _load_yaml(DEPLOY / "prometheus.yml")
    assert [job["job_name"] for job in config["scrape_configs"]] == ["s3proxy"]


def test_rule_files_valid(promtool: str) -> None:
    """promtool accepts the recording rules and the alerts."""
    files = [str(DEPLOY / "rules.yml"), str(DEPLOY / "alerts.yml")]
    result = _run([promtool, "check", "rules", *files])
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass(promtool: str) -> None:
    """The promtool unit tests in deploy/tests/ pass."""
    files = sorted(str(path) for path in (DEPLOY / "tests").glob("*.yml"))
    result = _run([promtool, "test", "rules", *files])
    assert result.returncode == 0, result.stdout + result.stderr


def test_recording_rule_names() -> None:
    """Every recorded name has the form level:metric:operations."""
    for rule in _rules(DEPLOY / "rules.yml"):
        assert _RECORDED_NAME.fullmatch(rule["record"]), rule["record"]


@pytest.mark.parametrize("outcome", ["firing", "silent"])
def test_every_alert_tested(outcome: str) -> None:
    """Each alert has a unit test where it fires and one where it stays silent."""
    alerts = {rule["alert"] for rule in _rules(DEPLOY / "alerts.yml")}
    tested = {
        case["alertname"]
        for case in _alert_tests()
        if bool(case.get("exp_alerts")) == (outcome == "firing")
    }
    assert sorted(alerts - tested) == []


def test_alerts_have_severity() -> None:
    """Each alert has a severity label of critical or warning."""
    for rule in _rules(DEPLOY / "alerts.yml"):
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]


@pytest.mark.parametrize("annotation", ["summary", "description", "runbook_url"])
def test_alerts_have_annotations(annotation: str) -> None:
    """Each alert has the annotation, not empty."""
    for rule in _rules(DEPLOY / "alerts.yml"):
        assert rule["annotations"].get(annotation), rule["alert"]


def test_runbook_covers_alerts() -> None:
    """Each alert's runbook_url points at a section of docs/runbook.md."""
    headings = re.findall(r"^#+ (.+)$", RUNBOOK.read_text(encoding="utf-8"), re.MULTILINE)
    anchors = {_github_anchor(heading) for heading in headings}
    for rule in _rules(DEPLOY / "alerts.yml"):
        path, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert path == "docs/runbook.md", rule["alert"]
        assert anchor in anchors, rule["alert"]


def test_dashboard_expressions_valid(promtool: str, tmp_path: Path) -> None:
    """promtool parses every dashboard expression, written as a recording rule."""
    rules = [
        {"record": f"dashboard:expression_{index}:check", "expr": expression}
        for index, expression in enumerate(_dashboard_expressions())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    result = _run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_variables_replaced() -> None:
    """No Grafana variable is left in an expression after the replacement."""
    for expression in _dashboard_expressions():
        assert "$" not in expression, expression


def test_recorded_names_defined() -> None:
    """Every recorded name used by alerts and the dashboard is a rule in rules.yml."""
    recorded = {rule["record"] for rule in _rules(DEPLOY / "rules.yml")}
    for expression in _all_expressions():
        for name in _RECORDED_NAME.findall(expression):
            assert name in recorded, f"{name} in {expression}"


def test_family_names_exist() -> None:
    """Every s3proxy_* family used by rules, alerts and dashboard exists in collector/."""
    known = (
        {definition.name for definition in APPLICATION_METRICS + WRITER_METRICS}
        | SELF_METRIC_NAMES
        | PLANNED_FAMILIES
    )
    for expression in _all_expressions():
        # A recorded name such as job:s3proxy_requests:rate5m contains no family name.
        raw = _RECORDED_NAME.sub("", expression)
        for name in _FAMILY_NAME.findall(raw):
            family = re.sub(r"_(bucket|sum|count)$", "", name)
            assert family in known, f"{name} in {expression}"


def test_metrics_doc_covers_families() -> None:
    """docs/metrics.md documents every family the collector exposes."""
    text = METRICS_DOC.read_text(encoding="utf-8")
    names = {definition.name for definition in APPLICATION_METRICS + WRITER_METRICS}
    for name in sorted(names | SELF_METRIC_NAMES):
        assert f"`{name}`" in text, name


def test_dashboard_identity() -> None:
    """The dashboard has a uid, a title and a current schema version."""
    dashboard = _dashboard()
    assert dashboard["uid"] == "s3proxy-overview"
    assert dashboard["title"] == "s3proxy"
    assert dashboard["schemaVersion"] >= 36


def test_dashboard_datasource_variable() -> None:
    """A template variable of type datasource selects the Prometheus data source."""
    variables = {item["name"]: item for item in _dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


def test_dashboard_backend_variable() -> None:
    """The backend variable lists the backend_id values of s3proxy_backend_state."""
    variables = {item["name"]: item for item in _dashboard()["templating"]["list"]}
    query = variables["backend"]["query"]["query"]
    assert query == "label_values(s3proxy_backend_state, backend_id)"


def test_dashboard_panel_ids_unique() -> None:
    """No two panels share an id."""
    ids = [panel["id"] for panel in _panels(_dashboard()["panels"])]
    assert len(ids) == len(set(ids))


def test_dashboard_panel_types() -> None:
    """Panels use current panel types only."""
    allowed = {"row", "stat", "timeseries", "state-timeline"}
    for panel in _panels(_dashboard()["panels"]):
        assert panel["type"] in allowed, panel["title"]


def test_dashboard_panels_complete() -> None:
    """Each panel has a grid position inside 24 columns, a data source and targets."""
    for panel in _panels(_dashboard()["panels"]):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, (
            panel["title"]
        )
        assert panel["targets"], panel["title"]


def test_dashboard_targets_have_ref_ids() -> None:
    """Each target has a refId, unique within its panel, and the panel's data source."""
    for panel in _panels(_dashboard()["panels"]):
        targets = panel.get("targets", [])
        ref_ids = [target["refId"] for target in targets]
        assert all(ref_ids), panel["title"]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in targets:
            assert target["datasource"] == panel["datasource"], panel["title"]


def test_dashboard_panels_do_not_overlap() -> None:
    """No two panels cover the same grid cell."""
    cells: dict[tuple[int, int], str] = {}
    for panel in _panels(_dashboard()["panels"]):
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells.get((x, y))}"
                cells[(x, y)] = panel["title"]
