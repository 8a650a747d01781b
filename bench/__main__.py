"""``python -m bench``: run every benchmark and write docs/benchmarks.md.

A full run takes a few minutes on 2 cores. ``--quick`` runs each measurement for about a
second, to prove in CI that the benchmarks still work; it writes no page unless
``--output`` is given. The exit status is 0 when every benchmark ran (missed targets are
reported, not failures), 1 when one failed and 2 when a required program is missing.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench.context import Context
from bench.processes import REPO_ROOT, MissingProgramError, require_programs
from bench.report import Benchmark, describe_machine, load_average, render_page

BenchmarkRun = Callable[[Context], Benchmark]

# name -> (module with a run(context) function, programs it needs, title used when it
# fails before returning its own). Modules are imported only when their benchmark runs.
BENCHMARKS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "recording": ("bench.recording", ("redis-server",), "Recording cost per call"),
    "flush": ("bench.flush", ("redis-server",), "Flush cost"),
    "scrape": ("bench.scrape", ("redis-server",), "Scrape cost"),
    "proxy": ("bench.proxy_load", ("redis-server", "nginx", "wrk"), "Proxy throughput and latency"),
    "streaming": ("bench.streaming", ("redis-server", "nginx", "curl"), "Streaming 1 GiB"),
}

DEFAULT_OUTPUT = REPO_ROOT / "docs" / "benchmarks.md"


def _memory_root() -> str | None:
    """Return /dev/shm when it is a writable directory, else None (the default temp dir)."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run the s3proxy benchmarks; every figure is compared with an anchor "
        "measured in the same run.",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="run each measurement for about a second (for CI); figures are noisy",
    )
    parser.add_argument(
        "--only", action="append", choices=sorted(BENCHMARKS), metavar="NAME",
        help=f"run only this benchmark; repeatable; one of {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--output", type=Path, default=None,
        help="Markdown page to write; default docs/benchmarks.md for a full run of every "
        "benchmark, none for --quick or --only",
    )
    parser.add_argument(
        "--redis-conf", type=Path, default=REPO_ROOT / "redis.conf", metavar="FILE",
        help="configuration file of the redis-servers the benchmarks start; default the "
        "repository's redis.conf (port, bind address, data directory and logging are "
        "overridden)",
    )
    parser.add_argument(
        "--keep", action="store_true",
        help="keep the scratch directory with server configurations and logs",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    arguments = parse_arguments(argv)
    names = arguments.only or list(BENCHMARKS)
    output = arguments.output
    if output is None and not arguments.quick and not arguments.only:
        output = DEFAULT_OUTPUT

    programs = sorted({program for name in names for program in BENCHMARKS[name][1]})
    try:
        require_programs(programs)
    except MissingProgramError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    directory = Path(tempfile.mkdtemp(prefix="s3proxy-bench-"))
    memory = Path(tempfile.mkdtemp(prefix="s3proxy-bench-", dir=_memory_root()))
    context = Context(
        quick=arguments.quick,
        directory=directory,
        memory_directory=memory,
        redis_conf=arguments.redis_conf,
    )
    started = time.monotonic()
    load_at_start = load_average()
    benchmarks: list[Benchmark] = []
    try:
        for name in names:
            module, _, title = BENCHMARKS[name]
            print(f"[{name}] running", flush=True)
            try:
                run: BenchmarkRun = importlib.import_module(module).run
                benchmarks.append(run(context))
            except Exception as err:
                traceback.print_exc()
                benchmarks.append(
                    Benchmark(name, title, "", error=f"{type(err).__name__}: {err}")
                )
                print(f"[{name}] failed: {type(err).__name__}: {err}", flush=True)
    finally:
        # Objects stored by PUT requests take memory in a tmpfs, so they go even with --keep.
        shutil.rmtree(memory, ignore_errors=True)
        if arguments.keep:
            print(f"scratch directory kept: {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    elapsed = time.monotonic() - started

    missed = sum(row.verdict == "MISSED" for benchmark in benchmarks for row in benchmark.rows)
    failed = [benchmark.key for benchmark in benchmarks if benchmark.error]
    print(
        f"finished in {elapsed:.0f} s: {len(benchmarks) - len(failed)} of {len(names)} "
        f"benchmarks ran, {missed} rows missed their target"
        + (f", failed: {', '.join(failed)}" if failed else "")
    )
    if output is not None:
        machine = describe_machine(REPO_ROOT, load_at_start)
        page = render_page(benchmarks, machine, arguments.quick, elapsed)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(page)
        print(f"wrote {output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
