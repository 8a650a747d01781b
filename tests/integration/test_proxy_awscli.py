"""The AWS CLI against twistd s3proxy: aws s3 cp/ls/rm and aws s3api, bytes exact."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.operations import classify, parse_target
from tests.support.proxy_process import (
    CLIENT_ACCESS_KEY,
    CLIENT_SECRET_KEY,
    MetricsWatch,
    ProxyProcess,
    counts_per_operation,
    promtool_check,
    proxy_stack,
)
from tests.support.servers import MotoServer

pytestmark = pytest.mark.integration

# urllib3 logs one line per response at debug level, for example
# http://127.0.0.1:9000 "PUT /bucket/key HTTP/1.1" 200 0
_RESPONSE_LINE = re.compile(
    r'urllib3\.connectionpool - DEBUG - \S+ "(\S+) (\S+) HTTP/1\.1" (\d{3})'
)


@pytest.fixture(scope="module")
def proxy(
    s3_server: MotoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    with proxy_stack(tmp_path_factory.mktemp("awscli"), s3_server) as running:
        yield running


class AwsCli:
    """Runs C{aws} with credentials from the environment and a private config file."""

    def __init__(self, proxy: ProxyProcess, directory: Path) -> None:
        binary = shutil.which("aws")
        if binary is None:
            pytest.fail("the aws command was not found; install awscli (setup.cfg test extra)")
        self.binary = binary
        self.proxy = proxy
        config = directory / "aws-config"
        config.write_text("[default]\nregion = us-east-1\n")
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(directory),
            "AWS_CONFIG_FILE": str(config),
            "AWS_SHARED_CREDENTIALS_FILE": str(directory / "no-credentials"),
            "AWS_ACCESS_KEY_ID": CLIENT_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": CLIENT_SECRET_KEY,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self.responses: Counter[tuple[str, str]] = Counter()

    def run(self, *args: str) -> str:
        """Run one command with --debug; count its responses; return its stdout."""
        result = subprocess.run(
            [self.binary, "--debug", "--endpoint-url", self.proxy.endpoint, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        for match in _RESPONSE_LINE.finditer(result.stderr):
            method, target, status = match.groups()
            path, _, query = target.encode("latin-1").partition(b"?")
            operation = classify(method, parse_target(path, None), query, False)
            self.responses[(operation, status)] += 1
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout


def test_aws_cli_round_trip(proxy: ProxyProcess, tmp_path: Path, promtool: str) -> None:
    """aws s3 cp/ls/rm and aws s3api move bytes exactly and are counted exactly."""
    watch = MetricsWatch(proxy)
    cli = AwsCli(proxy, tmp_path)
    bucket = "gw-awscli"
    source = tmp_path / "upload.bin"
    data = os.urandom(200_000) + b"\r\n\x00 end"
    source.write_bytes(data)

    cli.run("s3api", "create-bucket", "--bucket", bucket)
    cli.run("s3", "cp", str(source), f"s3://{bucket}/dir/file name.bin")
    listing = cli.run("s3", "ls", f"s3://{bucket}/dir/")
    assert "file name.bin" in listing

    downloaded = tmp_path / "download.bin"
    cli.run("s3", "cp", f"s3://{bucket}/dir/file name.bin", str(downloaded))
    assert downloaded.read_bytes() == data

    head = cli.run("s3api", "head-object", "--bucket", bucket, "--key", "dir/file name.bin")
    assert f'"ContentLength": {len(data)}' in head
    fetched = tmp_path / "s3api.bin"
    cli.run("s3api", "get-object", "--bucket", bucket, "--key", "dir/file name.bin", str(fetched))
    assert fetched.read_bytes() == data

    cli.run("s3", "rm", f"s3://{bucket}/dir/file name.bin")
    assert "file name.bin" not in cli.run("s3", "ls", f"s3://{bucket}/", "--recursive")

    expected = dict(cli.responses)
    totals, counts = watch.wait_for(expected)
    assert totals == {key: float(value) for key, value in expected.items()}
    assert counts == counts_per_operation(totals)
    code, output = promtool_check(promtool, watch.last_text)
    assert code == 0, output
