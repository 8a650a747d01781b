"""Type check of the Grafana dashboard against Grafana's dashboard schema.

The npm package @grafana/schema publishes Grafana's dashboard JSON model and the options of each
panel plugin as TypeScript types. The tests write deploy/grafana/s3proxy.json into a .ts file as
an object literal of the type in tests/deploy/grafana_schema.ts and run ``tsc --noEmit --strict``.
Object literals get excess-property checks, so tsc rejects a misspelled field as well as a wrong
type, an unknown enum value or a missing required field.

node and npm must be installed (``apt-get install -y nodejs npm``). The pinned npm packages are
installed once into ~/.cache/s3proxy-tests (or $XDG_CACHE_HOME/s3proxy-tests) and reused, so only
the first run needs the npm registry.
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE.parents[1] / "deploy" / "grafana" / "s3proxy.json"
SCHEMA_TYPES = HERE / "grafana_schema.ts"

# Exact versions, so that a new release of either package cannot change the verdict.
TYPESCRIPT_VERSION = "7.0.2"
GRAFANA_SCHEMA_VERSION = "13.2.3"
PACKAGES = {"typescript": TYPESCRIPT_VERSION, "@grafana/schema": GRAFANA_SCHEMA_VERSION}

NPM_INSTALL_TIMEOUT = 600  # seconds
TSC_TIMEOUT = 120  # seconds

TSC_OPTIONS = [
    "--noEmit",
    "--strict",
    "--target", "es2022",
    "--module", "nodenext",
    "--moduleResolution", "nodenext",
    # Check the dashboard, not the declaration files that @grafana/schema ships.
    "--skipLibCheck",
]

# Keys that Grafana's "Export for sharing externally" adds and its import reads. The schema's
# Dashboard type does not list them, so they are removed before the type check and checked by
# _export_key_problems() instead.
EXPORT_KEYS = ("__inputs", "__requires", "__elements")
INPUT_TYPES = {"datasource", "constant"}
REQUIREMENT_TYPES = {"grafana", "panel", "datasource"}

# Each case names a panel type (None for the dashboard itself), the path of keys and list indexes
# inside it, a field and its misspelling. Every field is optional in the schema, so tsc can reject
# the misspelled copy only for its unknown field, not for a missing one.
MISSPELLINGS = [
    (None, (), "graphTooltip", "graphToolTip"),
    (None, ("templating", "list", 1), "includeAll", "includeAl"),
    (None, ("annotations", "list", 0), "builtIn", "builtin"),
    ("row", (), "title", "tilte"),
    ("stat", (), "description", "descripton"),
    ("stat", ("options", "reduceOptions"), "fields", "field"),
    ("stat", ("fieldConfig", "defaults"), "unit", "units"),
    ("timeseries", ("fieldConfig", "defaults", "custom"), "showPoints", "showPoint"),
    ("timeseries", ("options", "legend"), "displayMode", "displaymode"),
    ("timeseries", ("targets", 0), "legendFormat", "legendFromat"),
    ("state-timeline", ("options",), "mergeValues", "mergeValue"),
]


def _load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "s3proxy-tests"


def _require_program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"required program {name!r} was not found on PATH; the Grafana schema check runs tsc "
            f"under Node.js, so install node and npm (apt-get install -y nodejs npm)"
        )
    return path


def _installed_version(packages_dir: Path, package: str) -> str | None:
    manifest = packages_dir / "node_modules" / package / "package.json"
    if not manifest.is_file():
        return None
    version: str = json.loads(manifest.read_text(encoding="utf-8"))["version"]
    return version


def _install_packages(npm: str, packages_dir: Path) -> None:
    """Install PACKAGES into ``packages_dir`` unless the pinned versions are already there."""
    if all(_installed_version(packages_dir, name) == pin for name, pin in PACKAGES.items()):
        return
    packages_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"private": True, "dependencies": PACKAGES}
    (packages_dir / "package.json").write_text(json.dumps(manifest, indent=2) + "\n")
    result = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--ignore-scripts"],
        cwd=packages_dir, capture_output=True, text=True, timeout=NPM_INSTALL_TIMEOUT, check=False,
    )
    if result.returncode != 0:
        pytest.fail(
            f"npm install of {PACKAGES} in {packages_dir} failed with exit code "
            f"{result.returncode}; check that the npm registry is reachable:\n"
            f"{result.stdout}{result.stderr}"
        )
    for name, pin in PACKAGES.items():
        installed = _installed_version(packages_dir, name)
        if installed != pin:
            pytest.fail(f"npm installed {name} {installed} in {packages_dir}, expected {pin}")


@pytest.fixture(scope="session")
def schema_packages() -> Path:
    """Directory whose node_modules contains the pinned typescript and @grafana/schema."""
    _require_program("node")
    npm = _require_program("npm")
    root = _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    packages_dir = root / f"grafana-schema-{GRAFANA_SCHEMA_VERSION}-ts-{TYPESCRIPT_VERSION}"

    # Parallel test runs share the cache directory, so only one of them installs at a time.
    with open(root / f"{packages_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _install_packages(npm, packages_dir)
    return packages_dir


def _strip_export_keys(dashboard: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``dashboard`` without the keys that only Grafana's import reads."""
    return {key: value for key, value in dashboard.items() if key not in EXPORT_KEYS}


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Yield every panel, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _input_problems(dashboard: dict[str, Any]) -> list[str]:
    inputs = dashboard["__inputs"]
    if not isinstance(inputs, list):
        return [f"__inputs is {type(inputs).__name__}, expected a list"]

    problems = []
    names = [item.get("name") for item in inputs if isinstance(item, dict)]
    text = json.dumps(_strip_export_keys(dashboard))
    for index, item in enumerate(inputs):
        where = f"__inputs[{index}]"
        if not isinstance(item, dict):
            problems.append(f"{where} is {type(item).__name__}, expected an object")
            continue
        for field in ("name", "label", "type"):
            if not isinstance(item.get(field), str) or not item[field]:
                problems.append(f"{where}.{field} is missing or not a non-empty string")
        if item.get("type") not in INPUT_TYPES:
            problems.append(f"{where}.type is {item.get('type')!r}, expected one of {INPUT_TYPES}")
        if item.get("type") == "datasource" and not item.get("pluginId"):
            problems.append(f"{where} is a data source input without pluginId")
        if item.get("type") == "constant" and not isinstance(item.get("value"), str):
            problems.append(f"{where} is a constant input without a string value")
        # Grafana's exporter writes ${name} wherever the dashboard uses the input.
        if isinstance(item.get("name"), str) and "${" + item["name"] + "}" not in text:
            problems.append(f"{where}.name {item['name']!r} is not used as ${{...}} anywhere")
    if len(names) != len(set(names)):
        problems.append(f"__inputs has duplicate names: {names}")
    return problems


def _requirement_problems(dashboard: dict[str, Any]) -> list[str]:
    requires = dashboard["__requires"]
    if not isinstance(requires, list):
        return [f"__requires is {type(requires).__name__}, expected a list"]

    problems = []
    for index, item in enumerate(requires):
        where = f"__requires[{index}]"
        if not isinstance(item, dict):
            problems.append(f"{where} is {type(item).__name__}, expected an object")
            continue
        for field in ("type", "id", "name"):
            if not isinstance(item.get(field), str) or not item[field]:
                problems.append(f"{where}.{field} is missing or not a non-empty string")
        # The exporter copies the plugin's info.version unchanged, so only its type is checked.
        if not isinstance(item.get("version"), str):
            problems.append(f"{where}.version is missing or not a string")
        if item.get("type") not in REQUIREMENT_TYPES:
            problems.append(
                f"{where}.type is {item.get('type')!r}, expected one of {REQUIREMENT_TYPES}"
            )

    # Grafana's export lists every panel plugin the dashboard uses. Rows are not plugins.
    required_panels = {
        item.get("id") for item in requires
        if isinstance(item, dict) and item.get("type") == "panel"
    }
    used_panels = {
        panel["type"] for panel in _panels(dashboard.get("panels", [])) if panel["type"] != "row"
    }
    for missing in sorted(used_panels - required_panels):
        problems.append(f"__requires does not list the panel plugin {missing!r}")
    return problems


def _element_problems(dashboard: dict[str, Any]) -> list[str]:
    elements = dashboard["__elements"]
    if not isinstance(elements, dict):
        return [f"__elements is {type(elements).__name__}, expected an object"]

    problems = []
    for uid, element in elements.items():
        if not isinstance(element, dict):
            problems.append(f"__elements[{uid!r}] is {type(element).__name__}, expected an object")
            continue
        for field in ("name", "uid", "kind", "model"):
            if field not in element:
                problems.append(f"__elements[{uid!r}] has no {field}")
    return problems


def _export_key_problems(dashboard: dict[str, Any]) -> list[str]:
    """List where the export keys of ``dashboard`` differ from what Grafana's import reads.

    The shapes are those that Grafana's DashboardExporter writes: __inputs is a list of data
    source inputs (name, label, type "datasource", pluginId) and constant inputs (type
    "constant", value); __requires is a list of {type, id, name, version}; __elements maps a
    library panel uid to {name, uid, kind, model}. A dashboard without these keys has no
    problems.
    """
    problems = []
    if "__inputs" in dashboard:
        problems += _input_problems(dashboard)
    if "__requires" in dashboard:
        problems += _requirement_problems(dashboard)
    if "__elements" in dashboard:
        problems += _element_problems(dashboard)
    return problems


def _type_check(
    dashboard: dict[str, Any], packages_dir: Path, work_dir: Path
) -> subprocess.CompletedProcess[str]:
    """Run tsc on ``dashboard`` typed as S3ProxyDashboard; return the finished process.

    The object literal starts on line 1 of dashboard.ts, so tsc's line numbers are those of the
    dashboard formatted by json.dumps(indent=2), which is how deploy/grafana/s3proxy.json is
    formatted.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "node_modules").symlink_to(packages_dir / "node_modules")
    shutil.copy(SCHEMA_TYPES, work_dir / SCHEMA_TYPES.name)
    literal = json.dumps(_strip_export_keys(dashboard), indent=2)
    (work_dir / "dashboard.ts").write_text(
        "import type { S3ProxyDashboard } from './grafana_schema'; "
        f"export const dashboard: S3ProxyDashboard = {literal};\n",
        encoding="utf-8",
    )
    tsc = packages_dir / "node_modules" / "typescript" / "bin" / "tsc"
    return subprocess.run(
        [_require_program("node"), str(tsc), *TSC_OPTIONS, "dashboard.ts"],
        cwd=work_dir, capture_output=True, text=True, timeout=TSC_TIMEOUT, check=False,
    )


def _misspell(dashboard: dict[str, Any], panel_type: str | None, path: tuple[Any, ...],
              field: str, misspelling: str) -> dict[str, Any]:
    """Return a copy of ``dashboard`` with ``field`` renamed to ``misspelling``.

    The field is looked up in the first panel of ``panel_type`` (or in the dashboard when it is
    None), then along ``path`` of keys and list indexes.
    """
    mutated = copy.deepcopy(dashboard)
    target: Any = mutated
    if panel_type is not None:
        target = next(panel for panel in _panels(mutated["panels"]) if panel["type"] == panel_type)
    for step in path:
        target = target[step]
    target[misspelling] = target.pop(field)
    return mutated


@pytest.mark.integration
def test_dashboard_matches_schema(schema_packages: Path, tmp_path: Path) -> None:
    """tsc accepts the dashboard as a dashboard of stat, timeseries and state-timeline panels."""
    result = _type_check(_load_dashboard(), schema_packages, tmp_path / "check")
    assert result.returncode == 0, (
        f"tsc rejected {DASHBOARD} (check files in {tmp_path / 'check'}):\n"
        f"{result.stdout}{result.stderr}"
    )


@pytest.mark.integration
@pytest.mark.parametrize(
    ("panel_type", "path", "field", "misspelling"),
    MISSPELLINGS,
    ids=[f"{case[0] or 'dashboard'}-{case[3]}" for case in MISSPELLINGS],
)
def test_schema_rejects_misspelled_field(
    schema_packages: Path, tmp_path: Path, panel_type: str | None, path: tuple[Any, ...],
    field: str, misspelling: str,
) -> None:
    """tsc rejects a copy of the dashboard with one field name misspelled, naming that field."""
    dashboard = _misspell(_load_dashboard(), panel_type, path, field, misspelling)

    result = _type_check(dashboard, schema_packages, tmp_path / "check")

    assert result.returncode != 0, f"tsc accepted the misspelled field {misspelling!r}"
    assert re.search(rf"error TS2353: .*'\"{misspelling}\"' does not exist", result.stdout), (
        result.stdout + result.stderr
    )


@pytest.mark.integration
def test_schema_rejects_unknown_enum_value(schema_packages: Path, tmp_path: Path) -> None:
    """tsc rejects a stat panel whose colorMode is not one of the schema's values."""
    dashboard = _load_dashboard()
    stat = next(panel for panel in _panels(dashboard["panels"]) if panel["type"] == "stat")
    stat["options"]["colorMode"] = "backgroud"

    result = _type_check(dashboard, schema_packages, tmp_path / "check")

    assert result.returncode != 0, "tsc accepted colorMode 'backgroud'"
    assert "'\"backgroud\"' is not assignable" in result.stdout, result.stdout + result.stderr


@pytest.mark.integration
def test_schema_ignores_export_keys(schema_packages: Path, tmp_path: Path) -> None:
    """tsc accepts the dashboard with __inputs, __requires and __elements, which it removes."""
    dashboard = {**_export_sample(), **_load_dashboard()}

    result = _type_check(dashboard, schema_packages, tmp_path / "check")

    assert result.returncode == 0, result.stdout + result.stderr


def _export_sample() -> dict[str, Any]:
    """Return export keys in the shape Grafana writes, valid for deploy/grafana/s3proxy.json."""
    return {
        "__inputs": [
            {
                "name": "datasource",
                "label": "Prometheus",
                "description": "",
                "type": "datasource",
                "pluginId": "prometheus",
                "pluginName": "Prometheus",
            }
        ],
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "11.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            {"type": "panel", "id": "stat", "name": "Stat", "version": ""},
            {"type": "panel", "id": "state-timeline", "name": "State timeline", "version": ""},
            {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""},
        ],
        "__elements": {},
    }


def test_dashboard_export_keys_valid() -> None:
    """The dashboard has no export keys, or export keys in the shape Grafana's import reads."""
    assert _export_key_problems(_load_dashboard()) == []


def test_export_keys_sample_valid() -> None:
    """Export keys in the shape Grafana writes pass the export key check."""
    problems = _export_key_problems({**_load_dashboard(), **_export_sample()})
    assert problems == []


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("__inputs", {}, "__inputs is dict, expected a list"),
        ("__inputs", [{"name": "DS_X", "label": "X", "type": "datasource"}], "without pluginId"),
        ("__inputs", [{"name": "VAR_X", "label": "X", "type": "constant"}], "without a string"),
        ("__inputs", [{"name": "x", "label": "X", "type": "secret", "value": ""}], "type is"),
        ("__requires", [{"type": "panel", "id": "stat", "name": "Stat"}], "version is missing"),
        ("__requires", [], "does not list the panel plugin 'timeseries'"),
        ("__elements", [], "__elements is list, expected an object"),
        ("__elements", {"abc": {"name": "n", "uid": "abc", "kind": 1}}, "has no model"),
    ],
    ids=[
        "inputs-not-list", "datasource-without-plugin", "constant-without-value",
        "unknown-input-type", "requirement-without-version", "panel-not-required",
        "elements-not-object", "element-without-model",
    ],
)
def test_export_key_check_rejects(key: str, value: Any, problem: str) -> None:
    """The export key check reports a malformed __inputs, __requires or __elements."""
    dashboard = {**_load_dashboard(), **_export_sample(), key: value}

    problems = _export_key_problems(dashboard)

    assert any(problem in item for item in problems), problems


def test_export_key_check_rejects_unused_input() -> None:
    """An input whose ${name} appears nowhere in the dashboard is reported."""
    dashboard = {**_load_dashboard(), **_export_sample()}
    dashboard["__inputs"][0]["name"] = "DS_PROMETHEUS"

    problems = _export_key_problems(dashboard)

    assert any("'DS_PROMETHEUS' is not used" in item for item in problems), problems
