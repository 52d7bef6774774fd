"""Rate limiting, side by side with limits, pyrate-limiter and slowapi, in one run.

Sections:

* ``redis``: checks per second and latency (p50, p99) at concurrency 1 and 64 against a
  dedicated local redis-server, next to the ceiling of a raw redis-py ``EVALSHA`` of
  ``return 1``;
* ``middleware``: microseconds per request that each middleware adds to a bare Starlette
  app called in process (no network, no HTTP client), next to the floor: a pass-through
  pure ASGI middleware that only adds a header, the least any middleware layer costs;
* ``http``: requests per second under uvicorn (httptools) driven by wrk: bare, behind the
  floor of a pass-through that adds the same two header fields, and behind the middleware
  on the memory backend (with and without header fields) and on Redis;
* ``instructions``: the same apps' instructions per request in the uvicorn process,
  counted by callgrind (deterministic where requests/s are not; needs valgrind).

Every figure is the median of ``--repeat`` runs; contenders alternate within each run so
that drift of the machine touches them alike.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis.asyncio

from benchmarks._apps import http_scope
from benchmarks._common import (
    Cell,
    Machine,
    Report,
    Run,
    Section,
    measure,
    median_run,
    run_cli,
)
from resilient import (
    MemoryBackend,
    RateLimiter,
    RateLimitMiddleware,
    RedisBackend,
    Rule,
    SlidingWindow,
    TokenBucket,
)
from resilient.testing import RedisServer, find_redis_server

PACKAGES = [
    "resilient-asgi",
    "redis",
    "hiredis",
    "limits",
    "pyrate-limiter",
    "slowapi",
    "starlette",
    "uvicorn",
    "httptools",
]
BIG = "1000000000/minute"  # nothing is denied: what is measured is the cost of a check

Op = Callable[[], Awaitable[object]]


# --- redis -------------------------------------------------------------------------------


async def redis_contenders(url: str, stack: list[Callable[[], Awaitable[None]]]) -> dict[str, Op]:
    from limits import parse
    from limits.aio.storage import RedisStorage
    from limits.aio.strategies import (
        FixedWindowRateLimiter,
        MovingWindowRateLimiter,
        SlidingWindowCounterRateLimiter,
    )
    from pyrate_limiter import Duration, Limiter, RedisBucket
    from pyrate_limiter import Rate as PyrateRate

    client = redis.asyncio.Redis.from_url(url, max_connections=256)
    stack.append(client.aclose)
    sha = await client.script_load("return 1")
    ours = RedisBackend(client)
    stack.append(ours.aclose)
    limiter = RateLimiter(ours)
    sliding, bucket = SlidingWindow(BIG), TokenBucket(BIG)

    storage = RedisStorage(f"async+{url}", implementation="redispy", max_connections=256)
    item = parse("1000000/minute")
    moving = MovingWindowRateLimiter(storage)
    counter = SlidingWindowCounterRateLimiter(storage)
    fixed = FixedWindowRateLimiter(storage)

    pyrate_client = redis.asyncio.Redis.from_url(url, max_connections=256)
    stack.append(pyrate_client.aclose)
    rate = PyrateRate(1_000_000, Duration.MINUTE)
    pyrate = Limiter(await RedisBucket.init([rate], pyrate_client, "bench-pyrate"))

    keys = iter(range(10**12))

    def key(kind: str) -> str:  # 64 keys in turn per contender: no hot spot
        return f"{kind}:user:{next(keys) % 64}"

    return {
        "raw EVALSHA `return 1` (ceiling)": lambda: client.evalsha(sha, 0),
        "resilient SlidingWindow": lambda: limiter.hit(key("sw"), sliding),
        "resilient TokenBucket": lambda: limiter.hit(key("tb"), bucket),
        "resilient TokenBucket, one hot key": lambda: limiter.hit("hot", bucket),
        "limits moving window": lambda: moving.hit(item, key("moving")),
        "limits sliding window counter": lambda: counter.hit(item, key("counter")),
        "limits fixed window": lambda: fixed.hit(item, key("fixed")),
        "pyrate-limiter RedisBucket": lambda: pyrate.try_acquire_async("k", blocking=False),
    }


async def bench_redis(url: str, repeat: int, quick: bool, found: list[Section]) -> str:
    stack: list[Callable[[], Awaitable[None]]] = []
    try:
        contenders = await redis_contenders(url, stack)
        sections = []
        for concurrency, per_worker in ((1, 300 if quick else 3000), (64, 10 if quick else 100)):
            runs: dict[str, list[Run]] = {name: [] for name in contenders}
            for op in contenders.values():  # warm up: connections, scripts, caches
                await measure(op, concurrency=concurrency, per_worker=max(1, per_worker // 10))
            for _ in range(repeat):
                for name, op in contenders.items():
                    runs[name].append(
                        await measure(op, concurrency=concurrency, per_worker=per_worker)
                    )
            medians = {name: median_run(r) for name, r in runs.items()}
            ceiling = next(iter(medians.values())).per_second
            rows: list[list[Cell]] = [
                [name, m.per_second, f"{m.per_second / ceiling:.2f}x", m.p50_us, m.p99_us]
                for name, m in medians.items()
            ]
            section = Section(
                key=f"redis-c{concurrency}",
                title=f"Redis: checks per second, concurrency {concurrency}",
                headers=["contender", "checks/s", "vs ceiling", "p50 µs", "p99 µs"],
                rows=rows,
                raw={
                    name: {
                        "checks/s": [r.per_second for r in rs],
                        "p50 µs": [r.p50_us for r in rs],
                        "p99 µs": [r.p99_us for r in rs],
                    }
                    for name, rs in runs.items()
                },
                chart=[1],
            )
            found.append(section)
            sections.append(f"#### Concurrency {concurrency}\n\n" + section.markdown())
        return "\n\n".join(sections)
    finally:
        for close in reversed(stack):
            await close()


def redis_benchmark(port: int) -> str:
    tool = shutil.which("redis-benchmark")
    if tool is None:
        return "(redis-benchmark not installed)"
    out = subprocess.run(
        [tool, "-p", str(port), "-t", "ping", "-P", "16", "-c", "64", "-n", "200000", "--csv"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    rates = [line.split(",")[1].strip('"') for line in out.splitlines()[1:] if "," in line]
    return " / ".join(f"{float(rate):,.0f} PING/s" for rate in rates) or "(no output)"


# --- middleware in process --------------------------------------------------------------


def middleware_apps() -> dict[str, Any]:
    from slowapi import Limiter as SlowLimiter
    from slowapi.middleware import SlowAPIASGIMiddleware, SlowAPIMiddleware
    from slowapi.util import get_remote_address
    from starlette.middleware import Middleware

    from benchmarks._apps import PassThrough, starlette_app

    def ours(headers: str) -> Any:
        limiter = RateLimiter(MemoryBackend())
        rules = [Rule(TokenBucket(BIG))]
        return RateLimitMiddleware(
            starlette_app(),
            limiter=limiter,
            rules=rules,
            headers=headers,  # type: ignore[arg-type]
        )

    def slow(middleware: Any) -> Any:
        from starlette.applications import Starlette
        from starlette.routing import Route

        from benchmarks._apps import hello

        app = Starlette(routes=[Route("/", hello)], middleware=[Middleware(middleware)])
        app.state.limiter = SlowLimiter(key_func=get_remote_address, default_limits=[BIG])
        return app

    return {
        "bare Starlette": starlette_app(),
        "floor: pass-through pure ASGI middleware (adds a header)": PassThrough(
            starlette_app(), [(b"x-floor", b"1")]
        ),
        "resilient RateLimitMiddleware (memory, IETF headers)": ours("ietf"),
        "resilient RateLimitMiddleware (memory, no headers)": ours("none"),
        "slowapi SlowAPIASGIMiddleware (memory)": slow(SlowAPIASGIMiddleware),
        "slowapi SlowAPIMiddleware (BaseHTTPMiddleware, memory)": slow(SlowAPIMiddleware),
    }


async def per_request_us(app: Any, n: int) -> float:
    scope = http_scope(client=("203.0.113.7", 40000))

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    start = time.perf_counter_ns()
    for _ in range(n):
        await app(dict(scope), receive, send)
    return (time.perf_counter_ns() - start) / n / 1000


async def bench_middleware(repeat: int, quick: bool, found: list[Section]) -> str:
    """Paired rounds: in each, every app serves a short burst, in turn; the cost added by
    an app is the median over rounds of (its time - bare's time in the same round), so
    that the machine's drift, which moves a whole round, cancels out."""
    apps = middleware_apps()
    n = 500 if quick else 2000
    rounds = 8 * repeat
    samples: dict[str, list[float]] = {name: [] for name in apps}
    for app in apps.values():
        await per_request_us(app, n)
    for _ in range(rounds):
        for name, app in apps.items():
            samples[name].append(await per_request_us(app, n))
    bare_times = samples["bare Starlette"]
    rows: list[list[Cell]] = []
    for name, values in samples.items():
        added = [value - bare for value, bare in zip(values, bare_times, strict=True)]
        rows.append([name, statistics.median(values), statistics.median(added)])
    section = Section(
        key="middleware",
        title="Middleware cost, in process",
        headers=["app", "µs per request", "µs added (median of paired rounds)"],
        rows=rows,
        raw={name: {"µs per request": values} for name, values in samples.items()},
        chart=[2],
    )
    found.append(section)
    return section.markdown()


# --- HTTP under uvicorn + wrk ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# Where the server and the load generator run. With two CPUs to spare and ``taskset``,
# uvicorn gets CPU 0 and a one-thread wrk CPU 1, so neither steals the other's core and
# runs are far less noisy; otherwise both float over the same cores, as before.
SERVER_CPU, CLIENT_CPU = 0, 1


def pinning() -> bool:
    """Return whether uvicorn and wrk can be pinned to CPUs of their own."""
    if shutil.which("taskset") is None or not hasattr(os, "sched_getaffinity"):
        return False
    if not {SERVER_CPU, CLIENT_CPU} <= os.sched_getaffinity(0):
        return False
    probe = ["taskset", "-c", str(CLIENT_CPU), "true"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def on_cpu(cpu: int | None, command: list[str]) -> list[str]:
    return command if cpu is None else ["taskset", "-c", str(cpu), *command]


def uvicorn_command(port: int) -> list[str]:
    """The command that serves ``benchmarks._apps:app`` (``BENCH_APP`` picks the app)."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "benchmarks._apps:app",
        "--port",
        str(port),
        "--http",
        "httptools",
        "--log-level",
        "warning",
        "--no-access-log",
    ]


def serve(kind: str, redis_url: str, cpu: int | None = None) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {**os.environ, "BENCH_APP": kind, "REDIS_URL": redis_url}
    process = subprocess.Popen(
        on_cpu(cpu, uvicorn_command(port)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return process, port
        time.sleep(0.05)
    process.kill()
    msg = f"uvicorn ({kind}) did not start"
    raise RuntimeError(msg)


def wrk(port: int, seconds: int, cpu: int | None = None) -> tuple[float, float]:
    """Return requests/s and the p99 latency in ms of *seconds* of wrk -c64 on *port*."""
    threads = "-t1" if cpu is not None else "-t2"  # one thread per CPU it may use
    command = ["wrk", threads, "-c64", f"-d{seconds}s", "--latency", f"http://127.0.0.1:{port}/"]
    out = subprocess.run(
        on_cpu(cpu, command),
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    # [ \t], not \s: the percentile's value is on its own line of the latency distribution.
    p99 = re.search(r"^[ \t]*99%[ \t]+([\d.]+)(us|ms|s)\b", out, re.MULTILINE)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    latency = float(p99[1]) * scale[p99[2]] if p99 else math.nan
    return (float(rate[1]) if rate else 0.0), latency


# The apps of the HTTP sections, by ``BENCH_APP`` kind (see benchmarks/_apps.py), as the
# tables label them. The report finds rows by these labels' first word.
HTTP_APPS = {
    "bare": "bare",
    "floor": "floor: pass-through adding the same two RateLimit fields",
    "memory": "memory",
    "memory-noheaders": "memory, no header fields",
    "redis": "redis",
}


def bench_http(redis_url: str, repeat: int, quick: bool, found: list[Section]) -> str:
    if shutil.which("wrk") is None:
        return "(wrk is not installed: `apt-get install wrk` to run this section)"
    # Every app is served at once (idle, a server costs nothing) and the load goes to one
    # after the other in short rounds: a round's apps run within seconds of each other, so
    # the machine's drift, which over minutes exceeds the differences between the apps,
    # touches each pair alike. "vs bare" is the median of the per-round ratios.
    seconds = 1 if quick else 3
    rounds = repeat if quick else 3 * repeat
    pinned = pinning()
    server_cpu, client_cpu = (SERVER_CPU, CLIENT_CPU) if pinned else (None, None)
    results: dict[str, list[float]] = {label: [] for label in HTTP_APPS.values()}
    p99s: dict[str, list[float]] = {label: [] for label in results}
    servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        for kind in HTTP_APPS:
            servers[kind] = serve(kind, redis_url, server_cpu)
            wrk(servers[kind][1], 2, client_cpu)  # warm up
        for _ in range(rounds):
            for kind, label in HTTP_APPS.items():
                rate, p99 = wrk(servers[kind][1], seconds, client_cpu)
                results[label].append(rate)
                p99s[label].append(p99)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=10)
    bare = results["bare"]
    rows: list[list[Cell]] = []
    for label, rates in results.items():
        ratio = statistics.median(rate / base for rate, base in zip(rates, bare, strict=True))
        p99 = statistics.median(p99s[label])
        rows.append([label, statistics.median(rates), f"{ratio:.2f}x", f"{p99:.2f}"])
    if pinned:
        setup = (
            f"uvicorn, 1 worker, httptools, pinned to CPU {SERVER_CPU}; "
            f"wrk -t1 -c64 pinned to CPU {CLIENT_CPU} (taskset; redis-server not pinned)"
        )
    else:
        setup = (
            "uvicorn, 1 worker, httptools; wrk -t2 -c64 on the same cores "
            "(not pinned: taskset or two CPUs unavailable)"
        )
    section = Section(
        key="http",
        title="HTTP: uvicorn + wrk",
        headers=["app", "requests/s", "vs bare", "wrk p99 ms"],
        rows=rows,
        raw={label: {"requests/s": rates} for label, rates in results.items()},
        chart=[1],
        note=(
            f"{setup}; every app served at once, {rounds} rounds of {seconds} s per app, the "
            'apps taking turns within each round; medians of the rounds ("vs bare": of the '
            "per-round ratios)."
        ),
    )
    found.append(section)
    return section.note + "\n\n" + section.markdown()


# --- HTTP: instructions per request under uvicorn (callgrind) ------------------------------
# Requests/s on a shared 2-core machine drift by a fifth from one minute to the next, more
# than the differences between the apps. Instructions do not drift: callgrind counts those
# the uvicorn process executes (interpreter, uvicorn, httptools, Starlette, the middleware;
# not the kernel), and the difference between two runs of FEW and MANY requests on one
# keep-alive connection is what one request costs, start-up and warm-up excluded.
FEW, MANY = 200, 1200


def _callgrind_total(kind: str, requests: int, out: Path) -> int:
    port = free_port()
    env = {**os.environ, "BENCH_APP": kind, "PYTHONHASHSEED": "0", "REDIS_URL": ""}
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    command += uvicorn_command(port)
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                msg = f"uvicorn ({kind}) under callgrind did not start"
                raise RuntimeError(msg)
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        with socket.create_connection(("127.0.0.1", port)) as sock:
            for _ in range(requests):
                sock.sendall(request)
                received = b""
                while not received.endswith(b"ok"):  # the body of every app's response
                    chunk = sock.recv(65536)
                    if not chunk:
                        msg = f"uvicorn ({kind}) closed the connection"
                        raise RuntimeError(msg)
                    received += chunk
                if not received.startswith(b"HTTP/1.1 200"):
                    msg = f"uvicorn ({kind}) answered {received[:40]!r}"
                    raise RuntimeError(msg)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    summary = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
    if summary is None:
        msg = f"no instruction count in {out}"
        raise RuntimeError(msg)
    return int(summary[1])


def bench_instructions(found: list[Section]) -> str:
    if shutil.which("valgrind") is None:
        return "(valgrind is not installed: `apt-get install valgrind` to run this section)"
    kinds = [kind for kind in HTTP_APPS if kind != "redis"]  # Redis's work is elsewhere
    jobs = [(kind, n) for kind in kinds for n in (FEW, MANY)]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(os.cpu_count() or 1) as pool:

        def count(job: tuple[str, int]) -> int:
            kind, requests = job
            return _callgrind_total(kind, requests, Path(tmp, f"{kind}.{requests}"))

        totals = dict(zip(jobs, pool.map(count, jobs), strict=True))
    per_request = {kind: (totals[kind, MANY] - totals[kind, FEW]) / (MANY - FEW) for kind in kinds}
    bare = per_request["bare"]
    rows: list[list[Cell]] = [
        [HTTP_APPS[kind], round(count), round(count - bare), f"{bare / count:.2f}x"]
        for kind, count in per_request.items()
    ]
    section = Section(
        key="instructions",
        title="HTTP: instructions per request under uvicorn",
        headers=["app", "instructions per request", "added", "bare / app"],
        rows=rows,
        raw={
            HTTP_APPS[kind]: {"instructions/request": [count]}
            for kind, count in per_request.items()
        },
        chart=[1],
        note=(
            "callgrind, uvicorn (httptools) process only; one keep-alive connection; "
            f"({MANY} requests - {FEW} requests) / {MANY - FEW}. Deterministic, unlike the "
            'requests/s above; "bare / app" is the requests/s ratio the app would get if '
            "time followed instructions."
        ),
    )
    found.append(section)
    return section.note + "\n\n" + section.markdown()


# --- main ----------------------------------------------------------------------------------


SECTIONS = ("redis", "middleware", "http", "instructions")


async def main_async(args: argparse.Namespace) -> Report:
    only = set(args.only or SECTIONS)
    found: list[Section] = []
    parts = ["# Rate limiting benchmarks", ""]
    with RedisServer() as server:
        machine = Machine.probe(PACKAGES, find_redis_server())
        parts += ["## Machine", "", machine.markdown(), ""]
        if "redis" in only:
            print("redis section...", file=sys.stderr, flush=True)
            parts += ["## Redis: checks per second", ""]
            alone = redis_benchmark(server.port)
            parts += [f"Redis alone (redis-benchmark PING, -P 16 -c 64): {alone}", ""]
            parts += [await bench_redis(server.url, args.repeat, args.quick, found), ""]
        if "middleware" in only:
            print("middleware section...", file=sys.stderr, flush=True)
            parts += ["## Middleware cost, in process", ""]
            parts += [await bench_middleware(args.repeat, args.quick, found), ""]
        if "http" in only:
            print("http section...", file=sys.stderr, flush=True)
            parts += ["## HTTP: uvicorn + wrk", ""]
            parts += [bench_http(server.url, args.repeat, args.quick, found), ""]
        if "instructions" in only and not args.quick:
            print("instructions section...", file=sys.stderr, flush=True)
            parts += ["## HTTP: instructions per request under uvicorn", ""]
            parts += [bench_instructions(found), ""]
    parts.append(
        f"Medians of {args.repeat} runs. Rerun: `python dev.py bench ratelimit"
        f"{' --quick' if args.quick else ''} --repeat {args.repeat}`."
    )
    return Report(markdown="\n".join(parts), machine=machine, sections=found)


def main(argv: list[str] | None = None) -> int:
    return run_cli("ratelimit", __doc__, main_async, argv, sections=SECTIONS)


if __name__ == "__main__":
    sys.exit(main())
