"""The run context every benchmark gets: the mode, scratch directories and the row printer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.report import Benchmark, Row, format_row

__all__ = ["Context"]


@dataclass
class Context:
    """The run a benchmark belongs to.

    :ivar quick: run each measurement for about a second, to prove the benchmarks work;
        the figures are then noisy.
    :ivar directory: scratch space for configuration files, data and server logs.
    :ivar memory_directory: scratch space in memory (``/dev/shm`` where it exists) for
        object files, so that large transfers measure no disk.
    :ivar redis_conf: the configuration every redis-server starts from.
    """

    quick: bool
    directory: Path
    memory_directory: Path
    redis_conf: Path

    def seconds(self, full: float, quick: float) -> float:
        """Return the duration for this mode: ``full`` or ``quick`` seconds."""
        return quick if self.quick else full

    def add(self, benchmark: Benchmark, row: Row) -> None:
        """Add ``row`` to ``benchmark`` and print it at once."""
        benchmark.rows.append(row)
        print(format_row(benchmark.key, row), flush=True)

    def note(self, benchmark: Benchmark, text: str) -> None:
        """Add a paragraph below the benchmark's table and print it."""
        benchmark.notes.append(text)
        print(f"[{benchmark.key}] note: {text}", flush=True)
