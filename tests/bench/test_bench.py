"""``python -m bench --quick`` runs every benchmark and prints its rows.

These tests never judge a speed: a figure on a shared CI machine proves nothing. They
check that every benchmark still runs end to end and reports what it measured.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import BENCHMARKS
from bench.report import Benchmark, Row, Target, render_page
from tests.support.servers import REPO_ROOT, require_binary

# Wall-clock limit in seconds for the whole quick run, which CI runs on every submission.
QUICK_RUN_TIMEOUT = 300

ROW_LINE = re.compile(
    r"^\[(?P<key>[a-z]+)\] .+: \S+ \S+ \| anchor .+: \S+ \S+ \| ratio \S+x \| target .+: "
    r"(?P<verdict>met|MISSED|no target)$"
)


@pytest.fixture(scope="module")
def quick_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One ``python -m bench --quick`` run for the module, with its page."""
    for program in ("redis-server", "nginx", "wrk", "curl"):
        require_binary(program)
    page = tmp_path_factory.mktemp("bench") / "benchmarks.md"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(page)],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=QUICK_RUN_TIMEOUT,
        check=False,
    )
    return completed, page


def _rows(output: str) -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for line in output.splitlines():
        match = ROW_LINE.match(line)
        if match:
            rows.setdefault(match.group("key"), []).append(line)
    return rows


@pytest.mark.integration
@pytest.mark.slow
def test_quick_run_exits_zero(quick_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    """The quick run exits with status 0, so no benchmark failed."""
    completed, _ = quick_run
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(BENCHMARKS))
def test_quick_run_prints_rows(
    quick_run: tuple[subprocess.CompletedProcess[str], Path], key: str
) -> None:
    """Every benchmark prints at least one complete row with figure, anchor and ratio."""
    completed, _ = quick_run
    assert _rows(completed.stdout).get(key), completed.stdout[-4000:] + completed.stderr[-4000:]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(BENCHMARKS))
def test_quick_run_reports_no_failure(
    quick_run: tuple[subprocess.CompletedProcess[str], Path], key: str
) -> None:
    """No benchmark reports that it failed."""
    completed, _ = quick_run
    assert f"[{key}] failed" not in completed.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_quick_run_writes_page(quick_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    """The page written by the quick run has a section for every benchmark."""
    _, page = quick_run
    text = page.read_text()
    missing = [title for _, _, title in BENCHMARKS.values() if f"## {title}" not in text]
    assert missing == []


def test_page_names_missed_target() -> None:
    """A row that misses its target is listed in the page's summary."""
    benchmark = Benchmark("demo", "Demo", "How it ran.")
    benchmark.rows.append(
        Row("ours", 2.0, "theirs", 1.0, "ns/call", Target("ratio_max", 1.0, "<= 1.00x"))
    )
    page = render_page([benchmark], [("CPU", "test")], quick=True, elapsed=1.0)
    assert "- **Missed** (Demo): ours is 2.000x theirs" in page


def test_target_difference_max() -> None:
    """A difference target compares figure minus anchor with the limit."""
    target = Target("difference_max", 0.1, "<= +0.1 ms")
    assert target.is_met(1.05, 1.0)
    assert not target.is_met(1.2, 1.0)
