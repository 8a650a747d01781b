"""twistd s3proxy recording its metrics into a real redis-server."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from tests.support.proxy_process import (
    CLIENT_ACCESS_KEY,
    CLIENT_SECRET_KEY,
    BotoCallLog,
    MetricsWatch,
    counts_per_operation,
    promtool_check,
    proxy_stack,
)
from tests.support.servers import MotoServer, RedisServer

pytestmark = pytest.mark.integration


def test_metrics_through_redis(
    s3_server: MotoServer, redis_server: RedisServer, tmp_path: Path, promtool: str
) -> None:
    """With redis_url set, every request is counted in Redis and served on /metrics."""
    with proxy_stack(tmp_path, s3_server, redis_url=redis_server.url) as proxy:
        watch = MetricsWatch(proxy)
        s3 = boto3.client(
            "s3",
            endpoint_url=proxy.endpoint,
            aws_access_key_id=CLIENT_ACCESS_KEY,
            aws_secret_access_key=CLIENT_SECRET_KEY,
            region_name="us-east-1",
        )
        calls = BotoCallLog(s3)
        s3.create_bucket(Bucket="gw-redis")
        s3.put_object(Bucket="gw-redis", Key="k", Body=b"stored via redis metrics")
        assert s3.get_object(Bucket="gw-redis", Key="k")["Body"].read().startswith(b"stored")
        with pytest.raises(ClientError):
            s3.get_object(Bucket="gw-redis", Key="missing")

        expected = dict(calls.calls)
        totals, counts = watch.wait_for(expected)
        assert totals == {key: float(value) for key, value in expected.items()}
        assert counts == counts_per_operation(totals)
        code, output = promtool_check(promtool, watch.last_text)
        assert code == 0, output

    keys = redis_server.client().keys("{s3proxy}*")
    assert keys
