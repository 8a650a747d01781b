"""docs/configuration.md lists exactly the keys and defaults that proxy/config.py accepts."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from proxy import config

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

SECTIONS: dict[str, type] = {
    "server": config.ServerConfig,
    "metrics": config.MetricsConfig,
    "users": config.UserConfig,
    "backends": config.BackendConfig,
    "health": config.HealthConfig,
    "cache": config.CacheConfig,
}
# Keys that the file accepts in place of a dataclass field.
ALTERNATIVE_KEYS = {
    "users": {"secret_key_env"},
    "backends": {"secret_key_env"},
    "metrics": {"redis_url_env"},
}


def _documented_tables() -> dict[str, dict[str, str]]:
    """Return {section: {key: default cell}} from the page's tables."""
    tables: dict[str, dict[str, str]] = {}
    section = None
    for line in DOC.read_text().splitlines():
        heading = re.match(r"## `\[\[?(\w+)\]\]?`", line)
        if heading:
            section = heading.group(1)
            tables[section] = {}
            continue
        row = re.match(r"\| `(\w+)` \| [^|]+ \| ([^|]+) \|", line)
        if section is not None and row:
            tables[section][row.group(1)] = row.group(2).strip()
    return tables


def _default_of(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _parse_cell(cell: str) -> Any:
    if cell == "required":
        return dataclasses.MISSING
    if cell == "none":
        return None
    literal = cell.strip("`")
    return tomllib.loads(f"value = {literal}")["value"]


def test_every_section_documented() -> None:
    """The page has one table per configuration section."""
    assert set(_documented_tables()) == set(SECTIONS)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_keys_match_loader(section: str) -> None:
    """The documented keys of a section are the keys the loader accepts."""
    fields = {field.name for field in dataclasses.fields(SECTIONS[section])}
    accepted = fields | ALTERNATIVE_KEYS.get(section, set())
    assert set(_documented_tables()[section]) == accepted


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_defaults_match_loader(section: str) -> None:
    """Every documented default equals the loader's default."""
    documented = _documented_tables()[section]
    for field in dataclasses.fields(SECTIONS[section]):
        expected = _default_of(field)
        if isinstance(expected, tuple):
            expected = list(expected)
        assert _parse_cell(documented[field.name]) == expected, f"{section}.{field.name}"


def test_example_loads() -> None:
    """The complete example at the end of the page passes validation."""
    example = DOC.read_text().split("```toml", 1)[1].split("```", 1)[0]
    environ = {
        "S3PROXY_APP1_SECRET": "app-secret",
        "S3PROXY_SITE_A_SECRET": "site-a-secret",
        "S3PROXY_SITE_B_SECRET": "site-b-secret",
    }
    loaded = config.parse_config(tomllib.loads(example), environ=environ)
    assert [backend.id for backend in loaded.backends] == ["site-a", "site-b"]
    assert loaded.cache.enabled is True
