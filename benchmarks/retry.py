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
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import backoff
import stamina
import stamina.instrumentation
import tenacity

from benchmarks._common import (
    AsyncCall,
    Machine,
    Report,
    Section,
    SyncCall,
    kind_markdown,
    kind_sections,
    rows_against_bare,
    run_cli,
    sample_calls,
)
from resilient import RetryBudget, retry
from resilient.testing import retries_without_waits

PACKAGES = ["resilient-asgi", "tenacity", "stamina", "backoff"]

OURS = "resilient `@retry()`"


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


async def bench_success(repeat: int, quick: bool) -> list[Section]:
    n = 20_000 if quick else 300_000
    samples = await sample_calls(sync_contenders(work), async_contenders(async_work), n, repeat)
    return kind_sections(
        "success",
        "A call that succeeds: what the decorator adds",
        ["decorator", "ns per call", "ns added", "added vs ours"],
        samples,
        lambda runs: rows_against_bare(runs, OURS),
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


async def bench_failure(repeat: int, quick: bool) -> list[Section]:
    n = 2_000 if quick else 20_000
    with no_waits():
        samples = await sample_calls(failing_sync(), failing_async(), n, repeat)
    return kind_sections(
        "failure",
        "A call that fails once, then succeeds (waits off)",
        ["decorator", "µs per call", "µs added", "added vs ours"],
        samples,
        lambda runs: rows_against_bare(runs, OURS, unit=1000),
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
        parts += [kind_markdown(pair), ""]
    if "failure" in only:
        print("failure section...", file=sys.stderr, flush=True)
        parts += ["## A call that fails once, then succeeds (waits off)", ""]
        pair = await bench_failure(args.repeat, args.quick)
        found += pair
        parts += [kind_markdown(pair), ""]
    parts.append(
        f"Medians of {args.repeat} runs. Rerun: `python dev.py bench retry"
        f"{' --quick' if args.quick else ''} --repeat {args.repeat}`."
    )
    return Report(markdown="\n".join(parts), machine=machine, sections=found)


def main(argv: list[str] | None = None) -> int:
    return run_cli("retry", __doc__, main_async, argv, sections=SECTIONS)


if __name__ == "__main__":
    sys.exit(main())
