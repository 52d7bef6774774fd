"""What every benchmark shares: timing helpers, machine facts, Markdown tables."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
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
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
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


@dataclass(frozen=True, kw_only=True)
class Machine:
    """Where a benchmark ran: hardware, Python, Redis and the versions of the contenders."""

    cpu: str
    cores: int | None
    memory: str
    python: str
    system: str
    redis: str | None
    packages: dict[str, str]

    @classmethod
    def probe(cls, packages: Sequence[str], redis_server: str | None = None) -> Machine:
        """Describe this machine, the versions of *packages* and of *redis_server*."""
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
        redis = None
        if redis_server:
            redis = subprocess.run(
                [redis_server, "--version"], capture_output=True, text=True, check=False
            ).stdout.strip()
        return cls(
            cpu=cpu,
            cores=os.cpu_count(),
            memory=memory,
            python=f"{platform.python_version()} ({platform.python_implementation()})",
            system=f"{platform.system()} {platform.release()}",
            redis=redis,
            packages={p: _version(p) for p in packages},
        )

    def markdown(self) -> str:
        """The facts as a Markdown list."""
        facts = [
            f"- CPU: {self.cpu}, {self.cores} cores; memory {self.memory}",
            f"- Python {self.python}, {self.system}",
        ]
        if self.redis:
            facts.append(f"- {self.redis}")
        facts.append("- packages: " + ", ".join(f"{p} {v}" for p, v in self.packages.items()))
        return "\n".join(facts)


def machine_facts(packages: Sequence[str], redis_server: str | None = None) -> str:
    return Machine.probe(packages, redis_server).markdown()


Cell = str | int | float | None


@dataclass(frozen=True, kw_only=True)
class Section:
    """One table of a benchmark: the figures as shown, and the runs behind them.

    *rows* hold the medians and ratios exactly as the Markdown table shows them; *raw*
    holds the value of every run, by row label and metric; *chart* names the numeric
    columns the report plots (one bar per row and column), none if it plots nothing;
    *note* is Markdown that says how the figures were taken, shown before the table.
    """

    key: str
    title: str
    headers: list[str]
    rows: list[list[Cell]]
    raw: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    chart: list[int] = field(default_factory=list)
    note: str = ""

    def markdown(self) -> str:
        """The section's table in Markdown."""
        return table(self.headers, self.rows)


@dataclass(frozen=True, kw_only=True)
class Report:
    """What a benchmark module's run returns: its Markdown report and the data behind it."""

    markdown: str
    machine: Machine
    sections: list[Section]


@dataclass(frozen=True, kw_only=True)
class Results:
    """A full run as saved in ``benchmarks/results/<name>.json``."""

    name: str
    taken: str  # when, UTC, ISO 8601
    repeat: int
    command: str
    machine: Machine
    sections: list[Section]

    def section(self, key: str) -> Section:
        """The section called *key*; ``KeyError`` if the run has none."""
        for section in self.sections:
            if section.key == key:
                return section
        raise KeyError(key)

    def to_json(self) -> str:
        """The results as a JSON document."""
        return json.dumps(dataclasses.asdict(self), indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Results:
        """Read results written by :meth:`to_json`."""
        data = json.loads(text)
        return cls(
            name=data["name"],
            taken=data["taken"],
            repeat=data["repeat"],
            command=data["command"],
            machine=Machine(**data["machine"]),
            sections=[Section(**section) for section in data["sections"]],
        )

    def save(self, directory: Path = RESULTS) -> Path:
        """Write ``<name>.json`` into *directory*; return its path."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.name}.json"
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, name: str, directory: Path = RESULTS) -> Results:
        """Read ``<name>.json`` from *directory*."""
        return cls.from_json((directory / f"{name}.json").read_text(encoding="utf-8"))


# --- per-call timing of plain and async functions -----------------------------------------

SyncCall = Callable[[], object]
AsyncCall = Callable[[], Awaitable[object]]


def sync_ns(call: SyncCall, n: int) -> float:
    """Nanoseconds per call of *call*, over *n* calls."""
    start = time.perf_counter_ns()
    for _ in range(n):
        call()
    return (time.perf_counter_ns() - start) / n


async def async_ns(call: AsyncCall, n: int) -> float:
    """Nanoseconds per awaited call of *call*, over *n* calls."""
    start = time.perf_counter_ns()
    for _ in range(n):
        await call()
    return (time.perf_counter_ns() - start) / n


async def sample_calls(
    sync_calls: dict[str, SyncCall], async_calls: dict[str, AsyncCall], n: int, repeat: int
) -> dict[str, dict[str, list[float]]]:
    """Time every contender, by kind (``def``, ``async def``): ns per call, one per round.

    Each contender is warmed up on ``n // 10`` calls; then *repeat* rounds time *n* calls
    of each, in turn, so that the machine's drift touches them alike.
    """
    sync_samples: dict[str, list[float]] = {name: [] for name in sync_calls}
    async_samples: dict[str, list[float]] = {name: [] for name in async_calls}
    for call in sync_calls.values():
        sync_ns(call, n // 10)
    for acall in async_calls.values():
        await async_ns(acall, n // 10)
    for _ in range(repeat):
        for name, call in sync_calls.items():
            sync_samples[name].append(sync_ns(call, n))
        for name, acall in async_calls.items():
            async_samples[name].append(await async_ns(acall, n))
    return {"def": sync_samples, "async def": async_samples}


def rows_against_bare(
    samples: dict[str, list[float]], ours: str, *, unit: float = 1.0, digits: int = 1
) -> list[list[Cell]]:
    """Rows of (contender, median, added over the bare call, added as a multiple of *ours*').

    The first contender of *samples* is the bare call. Medians are divided by *unit*; the
    multiple is shown with *digits* decimals.
    """
    medians = {name: statistics.median(values) / unit for name, values in samples.items()}
    bare_name = next(iter(medians))
    bare = medians[bare_name]
    added_by_ours = medians[ours] - bare
    rows: list[list[Cell]] = []
    for name, value in medians.items():
        added = value - bare
        ratio = "" if name == bare_name else f"{added / added_by_ours:.{digits}f}x"
        rows.append([name, value, added, ratio])
    return rows


def kind_sections(
    key: str,
    title: str,
    headers: list[str],
    samples: dict[str, dict[str, list[float]]],
    rows: Callable[[dict[str, list[float]]], list[list[Cell]]],
) -> list[Section]:
    """One section per kind of function (``def``, ``async def``); runs in nanoseconds."""
    return [
        Section(
            key=f"{key}-{kind}",
            title=f"{title}: `{kind}`",
            headers=headers,
            rows=rows(runs),
            raw={name: {"ns per call": values} for name, values in runs.items()},
            chart=[2],
        )
        for kind, runs in samples.items()
    ]


def kind_markdown(pair: Sequence[Section]) -> str:
    """The ``def`` and ``async def`` sections of :func:`kind_sections` in Markdown."""
    sync, asynchronous = pair
    return "#### `def`\n\n" + sync.markdown() + "\n\n#### `async def`\n\n" + asynchronous.markdown()


def run_cli(
    name: str,
    doc: str | None,
    main_async: Callable[[argparse.Namespace], Coroutine[Any, Any, Report]],
    argv: list[str] | None,
    *,
    sections: Sequence[str] = (),
) -> int:
    """Parse a benchmark's options, run it, print its report and, after a full run, save it.

    Options: ``--quick`` (a smoke test, nothing saved), ``--repeat`` (runs per figure, the
    median is reported) and, with *sections*, ``--only`` (a partial report is not saved).
    A full run writes ``results/<name>.md`` (the report) and ``results/<name>.json`` (the
    data behind it, from which ``python -m benchmarks report`` rebuilds the benchmark page).
    """
    import asyncio

    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (median)")
    if sections:
        parser.add_argument("--only", action="append", choices=sections, help="run only these")
    args = parser.parse_args(argv)
    report = asyncio.run(main_async(args))
    print(report.markdown)
    if not args.quick and not getattr(args, "only", None):
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{name}.md").write_text(report.markdown + "\n")
        Results(
            name=name,
            taken=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            repeat=args.repeat,
            command=f"python dev.py bench {name} --repeat {args.repeat}",
            machine=report.machine,
            sections=report.sections,
        ).save()
    return 0
