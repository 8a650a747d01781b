"""Benchmark rows, targets, the machine description and the Markdown page.

Every row compares one figure with an anchor measured in the same run, so a row stays
meaningful on another machine: the ratio is the result, the absolute figures are context.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

__all__ = [
    "Benchmark",
    "Row",
    "Target",
    "describe_machine",
    "format_row",
    "load_average",
    "render_page",
]

TargetKind = Literal["ratio_max", "ratio_below", "ratio_min", "difference_max"]


@dataclass(frozen=True)
class Target:
    """The condition a row must meet to pass.

    ``ratio_max``: figure / anchor <= limit; ``ratio_below``: figure / anchor < limit;
    ``ratio_min``: figure / anchor >= limit; ``difference_max``: figure - anchor <= limit,
    in the row's unit.
    """

    kind: TargetKind
    limit: float
    text: str

    def is_met(self, figure: float, anchor: float) -> bool:
        """Return whether ``figure`` reaches this target against ``anchor``."""
        if self.kind == "difference_max":
            return figure - anchor <= self.limit
        ratio = figure / anchor
        if self.kind == "ratio_max":
            return ratio <= self.limit
        if self.kind == "ratio_below":
            return ratio < self.limit
        return ratio >= self.limit


@dataclass(frozen=True)
class Row:
    """One measured figure and the anchor it is compared with.

    :ivar case: what ran, e.g. ``collector.Metrics: labels().inc()``.
    :ivar figure: the measured value, in ``unit``.
    :ivar anchor: what the anchor is, e.g. ``prometheus_client in-process``.
    :ivar anchor_figure: the anchor's value, in ``unit``.
    :ivar unit: the unit of both figures, e.g. ``ns/call`` or ``req/s``.
    :ivar target: what the row must reach; None for a row that only informs.
    :ivar note: a measuring detail that the section text leaves out, e.g. the backend.
    """

    case: str
    figure: float
    anchor: str
    anchor_figure: float
    unit: str
    target: Target | None = None
    note: str = ""

    @property
    def ratio(self) -> float:
        """figure / anchor figure; infinite when the anchor is 0."""
        if self.anchor_figure == 0:
            return float("inf")
        return self.figure / self.anchor_figure

    @property
    def verdict(self) -> str:
        """``met``, ``MISSED`` or ``no target``."""
        if self.target is None:
            return "no target"
        return "met" if self.target.is_met(self.figure, self.anchor_figure) else "MISSED"


@dataclass
class Benchmark:
    """One benchmark's section of the page: a title, how it was measured, its rows."""

    key: str
    title: str
    method: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None


def format_number(value: float) -> str:
    """Format a figure with about three significant digits."""
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def format_row(benchmark: str, row: Row) -> str:
    """Return the one-line form of ``row`` that the command prints."""
    target = row.target.text if row.target else "-"
    return (
        f"[{benchmark}] {row.case}: {format_number(row.figure)} {row.unit}"
        f" | anchor {row.anchor}: {format_number(row.anchor_figure)} {row.unit}"
        f" | ratio {row.ratio:.3f}x | target {target}: {row.verdict}"
    )


def _command_version(argv: Sequence[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    try:
        completed = subprocess.run(
            argv, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unknown ({err})"
    # nginx prints its version on stderr; wrk and curl print more than the version.
    output = (completed.stdout + completed.stderr).strip().splitlines()
    if not output:
        return "unknown"
    first = output[0].partition(" Copyright")[0].strip()
    if argv[0] == "curl":
        first = " ".join(first.split()[:2])
    return first


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else platform.processor() or "unknown"


def _memory() -> str:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return "unknown"
    match = re.search(r"^MemTotal:\s*(\d+) kB", text, re.MULTILINE)
    return f"{int(match.group(1)) / 1024 / 1024:.1f} GiB" if match else "unknown"


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _source_revision(root: Path) -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head} (with uncommitted changes)" if dirty else head


def load_average() -> str:
    """Return the 1, 5 and 15 minute load averages, which show other work on the machine."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def describe_machine(root: Path, load_at_start: str) -> list[tuple[str, str]]:
    """Return (item, value) pairs that describe this machine and the software versions."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cores = f"{os.cpu_count()} online" + (f", {usable} usable by this process" if usable else "")
    return [
        ("CPU", _cpu_model()),
        ("cores", cores),
        ("memory", _memory()),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("load average (1, 5, 15 min) at start", load_at_start),
        ("load average (1, 5, 15 min) at end", load_average()),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("Twisted", _package_version("twisted")),
        ("prometheus-client", _package_version("prometheus-client")),
        ("redis-py", _package_version("redis")),
        ("redis-server", _command_version(["redis-server", "--version"])),
        ("nginx", _command_version(["nginx", "-v"])),
        ("wrk", _command_version(["wrk", "-v"])),
        ("curl", _command_version(["curl", "--version"])),
        ("source", _source_revision(root)),
        ("command", " ".join(["python -m bench", *sys.argv[1:]])),
    ]


def _table(rows: Sequence[Row]) -> list[str]:
    lines = [
        "| what ran | figure | anchor | anchor figure | ratio | target | result |",
        "| --- | ---: | --- | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        case = row.case + (f" ({row.note})" if row.note else "")
        target = row.target.text if row.target else "-"
        result = "**MISSED**" if row.verdict == "MISSED" else row.verdict
        lines.append(
            f"| {case} | {format_number(row.figure)} {row.unit} | {row.anchor} "
            f"| {format_number(row.anchor_figure)} {row.unit} | {row.ratio:.3f}x "
            f"| {target} | {result} |"
        )
    return lines


def render_page(
    benchmarks: Sequence[Benchmark], machine: Sequence[tuple[str, str]], quick: bool,
    elapsed: float,
) -> str:
    """Return the Markdown page for a finished run."""
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmarks",
        "",
        "Written by `python -m bench`"
        + (" --quick (short runs; the figures are noisy)" if quick else "")
        + f" on {started}, in {elapsed:.0f} s. Every figure is compared with an anchor"
        " measured in the same run on the same machine; the ratio is the result, the"
        " absolute figures only hold for this machine. All servers ran on 127.0.0.1 next"
        " to the load generator, so they shared the cores listed below.",
        "",
    ]

    missed = [
        (benchmark, row)
        for benchmark in benchmarks
        for row in benchmark.rows
        if row.verdict == "MISSED"
    ]
    failed = [benchmark for benchmark in benchmarks if benchmark.error]
    targeted = [row for benchmark in benchmarks for row in benchmark.rows if row.target]
    lines += [
        "## Summary",
        "",
        f"{len(targeted) - len(missed)} of {len(targeted)} rows with a target met it.",
        "",
    ]
    for benchmark, row in missed:
        lines.append(
            f"- **Missed** ({benchmark.title}): {row.case} is {row.ratio:.3f}x "
            f"{row.anchor} ({format_number(row.figure)} vs "
            f"{format_number(row.anchor_figure)} {row.unit}); the target is "
            f"{row.target.text if row.target else '-'}."
        )
    for benchmark in failed:
        lines.append(f"- **Did not run** ({benchmark.title}): {benchmark.error}")
    lines.append("")

    lines += ["## Machine", "", "| item | value |", "| --- | --- |"]
    lines += [f"| {item} | {value} |" for item, value in machine]
    lines.append("")

    for benchmark in benchmarks:
        lines += [f"## {benchmark.title}", "", benchmark.method, ""]
        if benchmark.error:
            lines += [f"This benchmark failed: {benchmark.error}", ""]
        if benchmark.rows:
            lines += _table(benchmark.rows)
            lines.append("")
        for note in benchmark.notes:
            lines += [note, ""]
    return "\n".join(lines).rstrip() + "\n"
