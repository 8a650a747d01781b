"""Run wrk against one URL and return its counts and latency percentiles.

A Lua script makes wrk print its summary as JSON, and a run with any socket error or any
non-2xx/3xx status raises, so that a figure never counts rejected requests.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["WrkResult", "run_wrk"]

_REPORT = """
done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"socket_errors":%d,"status_errors":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d}\\n',
    summary.requests, summary.duration, summary.bytes,
    errors.connect + errors.read + errors.write + errors.timeout, errors.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""

_PUT = """
wrk.method = "PUT"
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.body = string.rep("x", {size})
"""


@dataclass(frozen=True)
class WrkResult:
    """The summary of one wrk run; latencies are in milliseconds."""

    requests: int
    seconds: float
    received_bytes: int
    p50_ms: float
    p90_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        """Completed requests per second."""
        return self.requests / self.seconds


def run_wrk(
    url: str,
    seconds: float,
    connections: int,
    directory: Path,
    put_size: int | None = None,
) -> WrkResult:
    """Load ``url`` with one wrk thread and ``connections`` connections for ``seconds``.

    :param put_size: send PUT requests with a body of this many bytes instead of GETs.
    :raises RuntimeError: when wrk fails, or any request failed or returned an error status.
    """
    script = directory / ("wrk-get.lua" if put_size is None else f"wrk-put-{put_size}.lua")
    body = "" if put_size is None else _PUT.replace("{size}", str(put_size))
    script.write_text(body + _REPORT)
    argv = [
        "wrk", "--threads", "1", "--connections", str(connections),
        "--duration", f"{max(1, round(seconds))}s", "--timeout", "30s",
        "--script", str(script), url,
    ]
    completed = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(
            f"wrk failed with status {completed.returncode}: {completed.stderr.strip()}\n"
            f"{completed.stdout.strip()}"
        )
    summary = json.loads(lines[-1])
    if summary["socket_errors"] or summary["status_errors"]:
        raise RuntimeError(
            f"wrk saw {summary['socket_errors']} socket errors and {summary['status_errors']} "
            f"error statuses of {summary['requests']} requests to {url.split('?')[0]}; "
            "the figures would count failed requests"
        )
    return WrkResult(
        requests=summary["requests"],
        seconds=summary["duration_us"] / 1e6,
        received_bytes=summary["bytes"],
        p50_ms=summary["p50_us"] / 1e3,
        p90_ms=summary["p90_us"] / 1e3,
        p99_ms=summary["p99_us"] / 1e3,
    )
