"""The httpx transports' own cost: what retry and breaker add to a request that succeeds.

* ``overhead``: nanoseconds per request through :class:`~resilient.httpx.SyncResilientTransport`
  (``def``) and :class:`~resilient.httpx.ResilientTransport` (``async def``), over a
  wrapped transport that answers at once from memory (no network, no ``httpx.Client``), so
  the figures are the transport's own work: with the defaults (retry, a breaker per host),
  and with ``retry=None, breaker=False``. The bare wrapped transport is the baseline.

Every figure is the median of ``--repeat`` runs; contenders alternate within each run.

Run it as ``python -m benchmarks.transport`` (not yet a block of the benchmark page).
``--against SRC`` runs the same measurement with the ``resilient`` of another checkout's
``src`` (say a worktree of an earlier commit) and with this one, alternating processes
round by round, and prints both side by side instead (nothing saved).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import httpx

from benchmarks._common import (
    AsyncCall,
    Machine,
    Report,
    SyncCall,
    kind_markdown,
    kind_sections,
    rows_against_bare,
    run_cli,
    sample_calls,
    table,
)

PACKAGES = ["resilient-asgi", "httpx"]
BARE = "wrapped transport alone"
DEFAULTS = "defaults (retry, a breaker per host)"
PLAIN = "`retry=None, breaker=False`"
ROOT = Path(__file__).resolve().parent.parent


class Answering(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """A wrapped transport that answers every request with the same 200 response."""

    def __init__(self) -> None:
        self.response = httpx.Response(200)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.response

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return self.response


def contenders() -> tuple[dict[str, SyncCall], dict[str, AsyncCall]]:
    """The requests to time, sync and async: one request object each, sent again and again."""
    from resilient.httpx import ResilientTransport, SyncResilientTransport

    inner = Answering()
    request = httpx.Request("GET", "http://api.example.test/v1/prices")
    defaults_sync = SyncResilientTransport(inner)
    plain_sync = SyncResilientTransport(inner, retry=None, breaker=False)
    sync: dict[str, SyncCall] = {
        BARE: lambda: inner.handle_request(request),
        DEFAULTS: lambda: defaults_sync.handle_request(request),
        PLAIN: lambda: plain_sync.handle_request(request),
    }
    defaults_async = ResilientTransport(inner)
    plain_async = ResilientTransport(inner, retry=None, breaker=False)
    asynchronous: dict[str, AsyncCall] = {
        BARE: lambda: inner.handle_async_request(request),
        DEFAULTS: lambda: defaults_async.handle_async_request(request),
        PLAIN: lambda: plain_async.handle_async_request(request),
    }
    return sync, asynchronous


async def sample(n: int, repeat: int) -> dict[str, dict[str, list[float]]]:
    sync, asynchronous = contenders()
    return await sample_calls(sync, asynchronous, n, repeat)


async def main_async(args: argparse.Namespace) -> Report:
    n = 5_000 if args.quick else 100_000
    machine = Machine.probe(PACKAGES)
    sections = kind_sections(
        "overhead",
        "A request that succeeds at once",
        ["transport", "ns per request", "ns added", "added vs defaults"],
        await sample(n, args.repeat),
        lambda runs: rows_against_bare(runs, DEFAULTS, digits=2),
    )
    parts = ["# httpx transport benchmarks", "", "## Machine", "", machine.markdown(), ""]
    parts += ["## A request that succeeds at once", "", kind_markdown(sections), ""]
    parts.append(
        f"Medians of {args.repeat} runs. Rerun: `python dev.py bench transport"
        f"{' --quick' if args.quick else ''} --repeat {args.repeat}`."
    )
    return Report(markdown="\n".join(parts), machine=machine, sections=sections)


def child(n: int) -> int:
    """One round in this process: print ns per request of every contender, as JSON."""
    import asyncio

    print(json.dumps(asyncio.run(sample(n, 1))))
    return 0


def against(other: str, n: int, repeat: int) -> int:
    """Time *other*'s ``resilient`` and this one in alternate processes; print both."""
    sources = {"before": str(Path(other).resolve()), "after": str(ROOT / "src")}
    runs: dict[tuple[str, str, str], list[float]] = {}
    for _ in range(repeat):
        for label, src in sources.items():
            env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{ROOT}"}
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.transport", "--child", str(n)],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            for kind, samples in json.loads(out).items():
                for name, values in samples.items():
                    runs.setdefault((kind, name, label), []).extend(values)
    rows = []
    for kind, name, label in runs:
        if label != "before":
            continue
        before = statistics.median(runs[kind, name, "before"]) / 1000
        after = statistics.median(runs[kind, name, "after"]) / 1000
        rows.append([kind, name, before, after, f"{(after / before - 1) * 100:+.0f}%"])
    print(f"before: {sources['before']}\nafter: {sources['after']}\n")
    print(table(["kind", "transport", "µs before", "µs after", "change"], rows))
    print(f"\nMedians of {repeat} alternating runs of {n:,} requests each.")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(int(argv[1]))
    if argv[:1] == ["--against"]:
        extra = argparse.ArgumentParser(prog="benchmarks transport --against SRC")
        extra.add_argument("src")
        extra.add_argument("--repeat", type=int, default=5)
        extra.add_argument("--quick", action="store_true")
        args = extra.parse_args(argv[1:])
        return against(args.src, 5_000 if args.quick else 100_000, args.repeat)
    return run_cli("transport", __doc__, main_async, argv)


if __name__ == "__main__":
    sys.exit(main())
