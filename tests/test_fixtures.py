"""The shared server fixtures start real servers and stop them."""

from __future__ import annotations

import urllib.request

import pytest

from tests.support.servers import MotoServer, RedisServer


@pytest.mark.integration
def test_redis_server_keeps_data_over_restart(redis_server: RedisServer) -> None:
    """A value written before a restart is still there after it, through the AOF."""
    redis_server.client().set("k", "v")
    redis_server.restart()
    assert redis_server.client().get("k") == b"v"


@pytest.mark.integration
def test_moto_server_answers(s3_server: MotoServer) -> None:
    """moto's S3 server answers a plain list-buckets request."""
    with urllib.request.urlopen(s3_server.endpoint + "/", timeout=10) as response:
        assert response.status == 200
