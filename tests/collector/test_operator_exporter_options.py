"""Invalid --namespace and --listen values of twistd s3proxy-exporter stop it with a message.

Both used to pass the option check and raise a ValueError traceback from makeService.
"""

from __future__ import annotations

import pytest
from twisted.python import usage

from collector.exporter_tap import Options

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--namespace", "a}b"), "metrics namespace 'a}b' is invalid"),
        (("--namespace", "two words"), "metrics namespace 'two words' is invalid"),
        (("--listen", "tcp:notaport"), "--listen 'tcp:notaport' is invalid"),
        (("--listen", "foo:1"), "--listen 'foo:1' is invalid"),
    ],
)
def test_exporter_rejects_option(args: tuple[str, ...], message: str) -> None:
    """An invalid namespace or endpoint raises UsageError that names the value."""
    options = Options()
    with pytest.raises(usage.UsageError) as raised:
        options.parseOptions(["--redis-url", REDIS_URL, *args])
    assert message in str(raised.value)


def test_exporter_accepts_endpoint() -> None:
    """A valid endpoint description and namespace pass unchanged."""
    options = Options()
    options.parseOptions(
        ["--redis-url", REDIS_URL, "--namespace", "team.a-1", "--listen", "unix:/tmp/e.sock"]
    )
    assert options["listen"] == "unix:/tmp/e.sock"
    assert options["namespace"] == "team.a-1"
