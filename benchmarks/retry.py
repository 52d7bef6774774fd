"""Retries, side by side with tenacity, stamina and backoff, in one run.

Sections:

* ``success``: nanoseconds that each retry decorator adds to a call that succeeds at once
  (the cost every call pays), sync and async, over the same bare function;
* ``failure``: microseconds for a call that fails once and then succeeds, waits turned
  off in each library's own way (the cost of one retry's machinery, not of sleeping).

Every figure is the median of ``--repeat`` runs; contenders alternate within each run so
that drift of the machine touches them alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import backoff
import stamina
import stamina.instrumentation
import tenacity

from benchmarks._common import Cell, Machine, Report, Section, run_cli
from resilient import RetryBudget, retry
from resilient.testing import retries_without_waits

PACKAGES = ["resilient-asgi", "tenacity", "stamina", "backoff"]

SyncCall = Callable[[], object]
AsyncCall = Callable[[], Awaitable[object]]


# --- the decorated functions ----------------------------------------------------------------


def work() -> int:
    return 1


async def async_work() -> int:
    return 1


def sync_contenders(target: Callable[[], int]) -> dict[str, SyncCall]:
    return {
        "bare call": target,
        "resilient `@retry()`": retry()(target),
        "resilient `@retry(deadline=5, budget=RetryBudget())`": retry(
            deadline=5.0, budget=RetryBudget()
        )(target),
        "tenacity `@retry(stop=stop_after_attempt(3))`": tenacity.retry(
            stop=tenacity.stop_after_attempt(3)
        )(target),
        "stamina `@retry(on=Exception, attempts=3)`": stamina.retry(on=Exception, attempts=3)(
            target
        ),
        "backoff `@on_exception(expo, Exception, max_tries=3)`": backoff.on_exception(
            backoff.expo, Exception, max_tries=3
        )(target),
    }


def async_contenders(target: Callable[[], Awaitable[int]]) -> dict[str, AsyncCall]:
    return {
        "bare call": target,
        "resilient `@retry()`": retry()(target),
        "resilient `@retry(deadline=5, budget=RetryBudget())`": retry(
            deadline=5.0, budget=RetryBudget()
        )(target),
        "tenacity `@retry(stop=stop_after_attempt(3))`": tenacity.retry(
            stop=tenacity.stop_after_attempt(3)
        )(target),
        "stamina `@retry(on=Exception, attempts=3)`": stamina.retry(on=Exception, attempts=3)(
            target
        ),
        "backoff `@on_exception(expo, Exception, max_tries=3)`": backoff.on_exception(
            backoff.expo, Exception, max_tries=3
        )(target),
    }


# --- timing ------------------------------------------------------------------------------------


def sync_ns(call: SyncCall, n: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(n):
        call()
    return (time.perf_counter_ns() - start) / n


async def async_ns(call: AsyncCall, n: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(n):
        await call()
    return (time.perf_counter_ns() - start) / n


def rows_against_bare(samples: dict[str, list[float]], unit: float = 1.0) -> list[list[Cell]]:
    medians = {name: statistics.median(values) / unit for name, values in samples.items()}
    bare = medians["bare call"]
    ours = medians["resilient `@retry()`"] - bare
    rows: list[list[Cell]] = []
    for name, value in medians.items():
        added = value - bare
        ratio = "" if name == "bare call" else f"{added / ours:.1f}x"
        rows.append([name, value, added, ratio])
    return rows


def sections(
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


def markdown(pair: list[Section]) -> str:
    sync, asynchronous = pair
    return "#### `def`\n\n" + sync.markdown() + "\n\n#### `async def`\n\n" + asynchronous.markdown()


async def bench_success(repeat: int, quick: bool) -> list[Section]:
    n = 20_000 if quick else 300_000
    sync_calls = sync_contenders(work)
    async_calls = async_contenders(async_work)
    sync_samples: dict[str, list[float]] = {name: [] for name in sync_calls}
    async_samples: dict[str, list[float]] = {name: [] for name in async_calls}
    for call in sync_calls.values():  # warm up
        sync_ns(call, n // 10)
    for acall in async_calls.values():
        await async_ns(acall, n // 10)
    for _ in range(repeat):
        for name, call in sync_calls.items():
            sync_samples[name].append(sync_ns(call, n))
        for name, acall in async_calls.items():
            async_samples[name].append(await async_ns(acall, n))
    return sections(
        "success",
        "A call that succeeds: what the decorator adds",
        ["decorator", "ns per call", "ns added", "added vs ours"],
        {"def": sync_samples, "async def": async_samples},
        rows_against_bare,
    )


# --- one failure, then success -----------------------------------------------------------------


class FailEveryOther:
    """Raises on every other call: each outer call fails once, is retried, succeeds."""

    def __init__(self) -> None:
        self.fail = False

    def __call__(self) -> int:
        self.fail = not self.fail
        if self.fail:
            raise ConnectionError
        return 1


class AsyncFailEveryOther(FailEveryOther):
    async def call(self) -> int:
        return self()


@contextmanager
def no_waits() -> Iterator[None]:
    """Each library's own way of not sleeping between retries, all at once."""
    hooks = stamina.instrumentation.get_on_retry_hooks()
    stamina.instrumentation.set_on_retry_hooks([])  # no log line per retry
    stamina.set_testing(True, attempts=3)
    try:
        with retries_without_waits():
            yield
    finally:
        stamina.set_testing(False)
        stamina.instrumentation.set_on_retry_hooks(hooks)


def failing_sync() -> dict[str, SyncCall]:
    def fresh() -> FailEveryOther:
        return FailEveryOther()

    return {
        "bare call (raises every other time)": _swallow(fresh()),
        "resilient `@retry()`": retry(observer=None)(fresh()),
        "tenacity `@retry(stop=stop_after_attempt(3))`": tenacity.retry(
            stop=tenacity.stop_after_attempt(3)
        )(fresh()),
        "stamina `@retry(on=Exception, attempts=3)`": stamina.retry(on=Exception, attempts=3)(
            fresh()
        ),
        "backoff `@on_exception(constant, ..., interval=0)`": backoff.on_exception(
            backoff.constant, Exception, max_tries=3, interval=0, jitter=None, logger=None
        )(fresh()),
    }


def failing_async() -> dict[str, AsyncCall]:
    def fresh() -> Callable[[], Awaitable[int]]:
        return AsyncFailEveryOther().call

    return {
        "bare call (raises every other time)": _aswallow(fresh()),
        "resilient `@retry()`": retry(observer=None)(fresh()),
        "tenacity `@retry(stop=stop_after_attempt(3))`": tenacity.retry(
            stop=tenacity.stop_after_attempt(3)
        )(fresh()),
        "stamina `@retry(on=Exception, attempts=3)`": stamina.retry(on=Exception, attempts=3)(
            fresh()
        ),
        "backoff `@on_exception(constant, ..., interval=0)`": backoff.on_exception(
            backoff.constant, Exception, max_tries=3, interval=0, jitter=None, logger=None
        )(fresh()),
    }


def _swallow(call: Callable[[], int]) -> SyncCall:
    def twice() -> int:  # what a retry does, by hand: call, catch, call again
        try:
            return call()
        except ConnectionError:
            return call()

    return twice


def _aswallow(call: Callable[[], Awaitable[int]]) -> AsyncCall:
    async def twice() -> int:
        try:
            return await call()
        except ConnectionError:
            return await call()

    return twice


def failure_rows(samples: dict[str, list[float]]) -> list[list[Cell]]:
    medians = {name: statistics.median(values) / 1000 for name, values in samples.items()}
    bare = next(iter(medians.values()))
    ours = medians["resilient `@retry()`"] - bare
    return [
        [name, us, us - bare, "" if us == bare else f"{(us - bare) / ours:.1f}x"]
        for name, us in medians.items()
    ]


async def bench_failure(repeat: int, quick: bool) -> list[Section]:
    n = 2_000 if quick else 20_000
    sync_calls, async_calls = failing_sync(), failing_async()
    sync_samples: dict[str, list[float]] = {name: [] for name in sync_calls}
    async_samples: dict[str, list[float]] = {name: [] for name in async_calls}
    with no_waits():
        for call in sync_calls.values():
            sync_ns(call, n // 10)
        for acall in async_calls.values():
            await async_ns(acall, n // 10)
        for _ in range(repeat):
            for name, call in sync_calls.items():
                sync_samples[name].append(sync_ns(call, n))
            for name, acall in async_calls.items():
                async_samples[name].append(await async_ns(acall, n))
    return sections(
        "failure",
        "A call that fails once, then succeeds (waits off)",
        ["decorator", "µs per call", "µs added", "added vs ours"],
        {"def": sync_samples, "async def": async_samples},
        failure_rows,
    )


# --- main --------------------------------------------------------------------------------------


SECTIONS = ("success", "failure")


async def main_async(args: argparse.Namespace) -> Report:
    only = set(args.only or SECTIONS)
    machine = Machine.probe(PACKAGES)
    found: list[Section] = []
    parts = ["# Retry benchmarks", "", "## Machine", "", machine.markdown(), ""]
    if "success" in only:
        print("success section...", file=sys.stderr, flush=True)
        parts += ["## A call that succeeds: what the decorator adds", ""]
        pair = await bench_success(args.repeat, args.quick)
        found += pair
        parts += [markdown(pair), ""]
    if "failure" in only:
        print("failure section...", file=sys.stderr, flush=True)
        parts += ["## A call that fails once, then succeeds (waits off)", ""]
        pair = await bench_failure(args.repeat, args.quick)
        found += pair
        parts += [markdown(pair), ""]
    parts.append(
        f"Medians of {args.repeat} runs. Rerun: `python dev.py bench retry"
        f"{' --quick' if args.quick else ''} --repeat {args.repeat}`."
    )
    return Report(markdown="\n".join(parts), machine=machine, sections=found)


def main(argv: list[str] | None = None) -> int:
    return run_cli("retry", __doc__, main_async, argv, sections=SECTIONS)


if __name__ == "__main__":
    sys.exit(main())
