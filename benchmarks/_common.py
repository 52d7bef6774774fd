"""What every benchmark shares: timing helpers, machine facts, Markdown tables."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Run:
    """One measurement: operations per second and latency percentiles in microseconds."""

    per_second: float
    p50_us: float
    p99_us: float


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


async def measure(op: Callable[[], Awaitable[object]], *, concurrency: int, per_worker: int) -> Run:
    """Run *op* `per_worker` times in each of `concurrency` coroutines; time each call."""
    import asyncio

    latencies: list[float] = []

    async def worker() -> None:
        clock = time.perf_counter_ns
        record = latencies.append
        for _ in range(per_worker):
            start = clock()
            await op()
            record((clock() - start) / 1000)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return Run(len(latencies) / elapsed, percentile(latencies, 0.5), percentile(latencies, 0.99))


def median_run(runs: Sequence[Run]) -> Run:
    return Run(
        statistics.median(r.per_second for r in runs),
        statistics.median(r.p50_us for r in runs),
        statistics.median(r.p99_us for r in runs),
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---" for _ in headers) + " |",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_facts(packages: Sequence[str], redis_server: str | None = None) -> str:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    facts = [
        f"- CPU: {cpu}, {os.cpu_count()} cores; memory {memory}",
        f"- Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.system()} {platform.release()}",
    ]
    if redis_server:
        version = subprocess.run(
            [redis_server, "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
        facts.append(f"- {version}")
    facts.append("- packages: " + ", ".join(f"{p} {_version(p)}" for p in packages))
    return "\n".join(facts)


def run_cli(
    name: str,
    doc: str | None,
    main_async: Callable[[argparse.Namespace], Coroutine[Any, Any, str]],
    argv: list[str] | None,
    *,
    sections: Sequence[str] = (),
) -> int:
    """Parse a benchmark's options, run it, print its report and, after a full run, save it.

    Options: ``--quick`` (a smoke test, nothing saved), ``--repeat`` (runs per figure, the
    median is reported) and, with *sections*, ``--only`` (a partial report is not saved).
    """
    import asyncio

    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (median)")
    if sections:
        parser.add_argument("--only", action="append", choices=sections, help="run only these")
    args = parser.parse_args(argv)
    report = asyncio.run(main_async(args))
    print(report)
    if not args.quick and not getattr(args, "only", None):
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{name}.md").write_text(report + "\n")
    return 0
