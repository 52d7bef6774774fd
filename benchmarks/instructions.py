"""CPU instructions a circuit breaker adds to a call, counted by valgrind's callgrind.

``python -m benchmarks.instructions [--calls N] [--cases a,b]``: for each form of a call
through a closed breaker that succeeds (a decorated ``def`` and ``async def``,
:meth:`~resilient.CircuitBreaker.call`, ``with``, ``async with``), and for the bare
function, the instructions one call costs: the difference between a run of ``2N`` calls
and a run of ``N``, divided by ``N``, so that start-up and warm-up cancel out. The count
does not drift with the machine's load, so a change of a few percent shows.

It measures whatever ``resilient`` the interpreter imports: run it with ``PYTHONPATH``
pointing at another checkout's ``src`` to compare two versions side by side. Needs
``valgrind`` on the ``PATH``; not part of ``python -m benchmarks`` for that reason.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

CASES = ("bare def", "def", "call()", "with", "bare async def", "async def", "async with")


def _work() -> int:
    return 1


async def _async_work() -> int:
    return 1


def _drive(coroutine: Any) -> None:
    try:
        coroutine.send(None)
    except StopIteration:
        return
    msg = "the benchmark's coroutine suspended"
    raise RuntimeError(msg)


def _loop(case: str, calls: int) -> None:
    """Make *calls* calls of *case*, after warming the breaker up (a full window)."""
    from resilient import CircuitBreaker

    breaker = CircuitBreaker("instructions")
    decorated = breaker(_work)
    decorated_async = breaker(_async_work)

    def sync_loop(n: int) -> None:
        if case == "bare def":
            for _ in range(n):
                _work()
        elif case == "def":
            for _ in range(n):
                decorated()
        elif case == "call()":
            call = breaker.call
            for _ in range(n):
                call(_work)
        elif case == "with":
            for _ in range(n):
                with breaker:
                    pass

    async def async_loop(n: int) -> None:
        if case == "bare async def":
            for _ in range(n):
                await _async_work()
        elif case == "async def":
            for _ in range(n):
                await decorated_async()
        elif case == "async with":
            for _ in range(n):
                async with breaker:
                    pass

    run: Callable[[int], None] = (lambda n: _drive(async_loop(n))) if "async" in case else sync_loop
    run(1000)  # warm up: the window fills with successes
    run(calls)


def count(case: str, calls: int) -> int:
    """Return the instructions of one run of *case* making *calls* calls."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-m",
                "benchmarks.instructions",
                "--child",
                case,
                str(calls),
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        found = re.search(r"^summary:\s+(\d+)", out.read_text(), re.MULTILINE)
        if found is None:
            msg = f"no summary in callgrind's output for {case!r}"
            raise RuntimeError(msg)
        return int(found.group(1))


def per_call(case: str, calls: int) -> float:
    """Instructions of one call of *case*: (run of 2N - run of N) / N."""
    return (count(case, 2 * calls) - count(case, calls)) / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=20_000, help="N (default 20,000)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _loop(args.child[0], int(args.child[1]))
        return 0
    import resilient

    print(f"resilient from {Path(resilient.__file__).parent}")
    print("| case | instructions per call |")
    print("| --- | --- |")
    for case in args.cases.split(","):
        if case not in CASES:
            parser.error(f"unknown case {case!r}; the cases are {', '.join(CASES)}")
        print(f"| {case} | {per_call(case, args.calls):,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
