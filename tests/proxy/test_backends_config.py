"""Validation of the backend health settings that the backend manager relies on."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config import ConfigError, parse_config


def document(**backend: Any) -> dict[str, Any]:
    """Return a minimal valid configuration whose one backend has the extra ``backend`` keys."""
    return {
        "users": [{"access_key": "client", "secret_key": "client-secret"}],
        "backends": [{
            "id": "one",
            "endpoint": "http://127.0.0.1:9100",
            "access_key": "backend",
            "secret_key": "backend-secret",
            **backend,
        }],
    }


@pytest.mark.parametrize("bucket", ["a/b", "with space", ""])
def test_health_bucket_invalid(bucket: str) -> None:
    """A health_bucket that is empty or would change the check's path is rejected."""
    with pytest.raises(ConfigError, match=r"backends\[0\]\.health_bucket"):
        parse_config(document(health_bucket=bucket))


def test_health_bucket_valid() -> None:
    """An ordinary bucket name is accepted as it is."""
    config = parse_config(document(health_bucket="health-check.1"))
    assert config.backends[0].health_bucket == "health-check.1"
