"""The example shop under load: requests/s and latency, in memory and on Redis, audited.

The shop runs as it does in production, through its own entry point (``python -m
examples.ecommerce``: uvicorn, its payment provider as a separate process, SQLite in WAL
mode), and wrk drives it with ``benchmarks/ecommerce_load.lua``:

* ``healthz``: ``GET /healthz`` (through every middleware, no rule applies): the ceiling;
* ``read``: the catalog as shoppers browse it: listings with varied filters and pages
  (55%), product pages, popular ones more often (40%), the JWKS and ``/readyz`` (5%);
* ``order``: signed-in customers ``POST /api/orders`` with a new ``Idempotency-Key`` each,
  one request in ten resending an earlier key with its body (a client retrying).

Configurations: the memory backend with one process, Redis with one process, and Redis
with two processes (``--workers 2``); Redis is a dedicated ``redis-server`` on a free
port, flushed before each run. Each run starts a fresh shop from a copy of one seeded
database and reports requests/s, p50/p99, every status code, the shop's resident memory
and Redis's ``used_memory``. After each order run the books are audited exactly: every
key whose request got no answer (the run ends mid-request) is sent again, as a client
would; then every key that got a 201 maps to one paid order with the key's lines, no two
keys share an order, no order is left pending, and each product's stock equals its seeded
stock less what paid orders took (so it is never negative and nothing was sold twice).

The shop limits every user (per client IP when anonymous) to 20 requests a second, bursts
of 40. The load keeps each client below that, as real traffic is: reads come from 2,000
client addresses (in ``X-Forwarded-For``, believed from loopback through the documented
``SHOP_TRUSTED_PROXIES``), orders from the 24 seeded accounts, one connection each, each
order waiting on a 50 ms charge. So the limiter does its full work on every request and
what is measured is the shop serving; a 429 would show in the status columns.

Every figure is the median of ``--repeat`` runs; configurations alternate within each
repeat. ``--only memory|redis|redis-2`` runs one configuration (nothing saved).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from benchmarks._common import Cell, Machine, Report, Section, run_cli
from examples.ecommerce.__main__ import wait_until_up
from examples.ecommerce.db import SEEDED_CUSTOMERS, USERS, Database
from resilient.testing import RedisServer, find_redis_server

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_suffix(".lua")
PACKAGES = ["resilient-asgi", "starlette", "uvicorn", "httptools", "redis", "hiredis"]
CLIENTS = 2000  # client addresses of the read mix
REPLAYS = 0.1  # share of order requests that resend an earlier key
READ_CONNECTIONS = 64
ACCOUNTS = [(name, password) for name, (password, _) in USERS.items()] + [
    (f"customer{n:03d}", f"password-{n}") for n in range(1, SEEDED_CUSTOMERS + 1)
]
# With two CPUs to spare, one shop process gets CPU 0 and everything else (wrk, Redis, the
# payment provider) CPU 1, so the load generator never takes the shop's core.
SHOP_CPU, LOAD_CPU = 0, 1


@dataclass(frozen=True)
class Config:
    """One way to run the shop."""

    key: str
    label: str
    redis: bool
    workers: int


CONFIGS = (
    Config("memory", "memory, 1 process", redis=False, workers=1),
    Config("redis", "Redis, 1 process", redis=True, workers=1),
    Config("redis-2", "Redis, 2 processes", redis=True, workers=2),
)
MIXES = ("healthz", "read", "order")


@dataclass
class Run:
    """One wrk run against one shop."""

    per_second: float
    p50_ms: float
    p99_ms: float
    statuses: Counter[int]
    errors: int
    rss_mib: list[float]
    cpu_cores: float
    redis_mib: float | None
    audit: Audit | None = None

    @property
    def non_2xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if not 200 <= status < 300)


@dataclass
class Audit:
    """The order books after a run, checked against what the clients were told."""

    keys: int = 0  # distinct keys sent
    created: int = 0  # keys whose answer was a 201
    replayed: int = 0  # 201 answers marked Idempotent-Replayed
    resent: int = 0  # keys sent again after the run, their answer lost when it ended
    paid: int = 0  # paid orders in SQLite
    problems: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.problems:
            return "FAILED: " + "; ".join(self.problems[:3])
        return f"exact: {self.paid:,} paid orders = {self.created:,} keys answered 201"


# --- processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinning() -> bool:
    """Whether the shop and the load can have CPUs of their own."""
    if not hasattr(os, "sched_setaffinity") or shutil.which("taskset") is None:
        return False
    return {SHOP_CPU, LOAD_CPU} <= os.sched_getaffinity(0)


def pin(pid: int, cpu: int) -> None:
    """Move every thread of process *pid* to *cpu*."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task.name), {cpu})


def children(pid: int) -> list[tuple[int, str]]:
    """The child processes of *pid*: (pid, command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append((int(entry.name), command))
    return found


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


class Shop:
    """``python -m examples.ecommerce`` on free ports, over a copy of a seeded database."""

    def __init__(self, config: Config, template: Path, workdir: Path, redis_url: str | None):
        self.config = config
        self.port, self.payment_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = workdir / "data"
        shutil.rmtree(self.data, ignore_errors=True)
        self.data.mkdir(parents=True)
        shutil.copy(template, self.data / "shop.sqlite3")
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "SHOP_DATA_DIR": str(self.data),
            "SHOP_PRODUCTS": str(products_in(template)),
            "SHOP_TRUSTED_PROXIES": "127.0.0.1/32",
        }
        env.pop("REDIS_URL", None)
        if redis_url:
            env["REDIS_URL"] = redis_url
        command = [
            sys.executable, "-m", "examples.ecommerce", "--port", str(self.port),
            "--payment-port", str(self.payment_port), "--workers", str(config.workers),
        ]  # fmt: skip
        self.pinned = pinning()
        if self.pinned and config.workers == 1:
            command = ["taskset", "-c", str(SHOP_CPU), *command]
        self.process = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_until_up(f"{self.url}/healthz", timeout=60)
            self._wait_for_workers()
        except BaseException:
            self.stop()
            raise
        if self.pinned:
            for pid, command_line in children(self.process.pid):
                if "examples.ecommerce.payments" in command_line:
                    pin(pid, LOAD_CPU)

    def _wait_for_workers(self) -> None:
        deadline = time.monotonic() + 60
        while len(self.serving()) < self.config.workers and time.monotonic() < deadline:
            time.sleep(0.1)
        seen: set[int] = set()
        while len(seen) < self.config.workers and time.monotonic() < deadline:
            with httpx.Client(base_url=self.url) as client:  # a new connection each time
                seen.add(client.get("/healthz").json()["process"])

    def serving(self) -> list[int]:
        """The processes that serve requests (uvicorn's workers, or the one process)."""
        if self.config.workers == 1:
            return [self.process.pid]
        return [
            pid
            for pid, command in children(self.process.pid)
            if "spawn_main" in command and "resource_tracker" not in command
        ]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def products_in(database: Path) -> int:
    with contextlib.closing(sqlite3.connect(database)) as db:
        (count,) = db.execute("SELECT count(*) FROM products").fetchone()
    return int(count)


def login_all(url: str) -> list[tuple[str, str]]:
    """Sign every account in; (user id, token) each. One address per login: the form is
    limited per client IP."""
    tokens = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for n, (username, password) in enumerate(ACCOUNTS, start=1):
            response = client.post(
                "/api/login",
                json={"username": username, "password": password},
                headers={"X-Forwarded-For": f"192.0.2.{n}"},
            )
            response.raise_for_status()
            body = response.json()
            tokens.append((body["user_id"], body["access_token"]))
    return tokens


# --- wrk ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    """What the script's ``done()`` printed."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    statuses: Counter[int]

    @classmethod
    def parse(cls, line: str) -> WrkResult:
        data = json.loads(line.removeprefix("RESULT "))
        return cls(
            requests=int(data["requests"]),
            seconds=int(data["duration_us"]) / 1e6,
            p50_ms=int(data["p50_us"]) / 1000,
            p99_ms=int(data["p99_us"]) / 1000,
            errors=int(data["errors"]),
            statuses=Counter({int(k): int(v) for k, v in data["statuses"].items()}),
        )


def wrk(
    url: str,
    mix: str,
    seconds: float,
    *,
    products: int,
    out: Path,
    tokens: Path,
    seed: int,
    pinned: bool,
    connections: int,
) -> WrkResult:
    threads = connections if mix == "order" else (1 if pinned else 2)
    command = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
        "--timeout", "10s", "-s", str(SCRIPT), url, "--",
        mix, str(products), str(CLIENTS), str(out), str(tokens), str(seed), str(REPLAYS),
    ]  # fmt: skip
    if pinned:
        command = ["taskset", "-c", str(LOAD_CPU), *command]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return WrkResult.parse(line)
    msg = f"wrk gave no result (exit {done.returncode}): {done.stderr.strip()[-500:]}"
    raise RuntimeError(msg)


# --- the audit --------------------------------------------------------------------------------


@dataclass
class Key:
    """What happened to one idempotency key, from the clients' side."""

    user: int  # index into the tokens
    body: str
    answers: list[tuple[int, bool, int | None]] = field(default_factory=list)


def read_logs(directories: Sequence[Path]) -> dict[str, Key]:
    """Every key the order threads sent, and the answers each got (thread N is account
    N - 1 modulo the accounts, one connection each)."""
    keys: dict[str, Key] = {}
    for path in sorted(p for directory in directories for p in directory.glob("thread-*.log")):
        thread = int(path.stem.split("-")[1])
        last: str | None = None
        for line in path.read_text().splitlines():
            kind, *fields = line.split("\t")
            if kind == "S":
                key, body = fields
                keys.setdefault(key, Key((thread - 1) % len(ACCOUNTS), body))
                last = key
            elif kind == "R" and last is not None:
                status, replayed, order = fields
                order_id = int(order) if order.isdigit() else None
                keys[last].answers.append((int(status), replayed == "1", order_id))
                last = None
    return keys


def resend_lost(url: str, keys: dict[str, Key], tokens: Sequence[tuple[str, str]]) -> int:
    """Send again every key that got no answer: a replay if it ran, a first run if not."""
    lost = [key for key, state in keys.items() if not state.answers]
    with httpx.Client(base_url=url, timeout=30) as client:
        for key in lost:
            state = keys[key]
            for _ in range(100):
                response = client.post(
                    "/api/orders",
                    content=state.body,
                    headers={
                        "Authorization": f"Bearer {tokens[state.user][1]}",
                        "Content-Type": "application/json",
                        "Idempotency-Key": key,
                    },
                )
                # Still running (409 with Retry-After), or over a limit: ask again.
                if response.status_code not in (409, 429) or "retry-after" not in response.headers:
                    break
                time.sleep(0.1)
            order_id = response.json().get("id") if response.status_code == 201 else None
            replayed = response.headers.get("idempotent-replayed") == "true"
            state.answers.append((response.status_code, replayed, order_id))
    return len(lost)


def lines_of(body: str) -> dict[int, int]:
    wanted: dict[int, int] = {}
    for line in json.loads(body)["items"]:
        wanted[line["product_id"]] = wanted.get(line["product_id"], 0) + line["quantity"]
    return wanted


def audit(
    keys: dict[str, Key], resent: int, database: Path, template: Path, users: Sequence[str]
) -> Audit:
    """Check the books in *database* against what the clients were told."""
    result = Audit(keys=len(keys), resent=resent)
    order_of = answered_orders(keys, result)
    check_books(keys, order_of, database=database, template=template, users=users, result=result)
    return result


def answered_orders(keys: dict[str, Key], result: Audit) -> dict[str, int]:
    """Key -> the order its 201s named; every key names one order, its own."""
    order_of: dict[str, int] = {}
    for key, state in keys.items():
        created = [order for status, _, order in state.answers if status == 201]
        named = {order for order in created if order is not None}
        result.replayed += sum(1 for _, replayed, _ in state.answers if replayed)
        first_runs = sum(
            1 for status, replayed, _ in state.answers if status == 201 and not replayed
        )
        if len(named) > 1 or first_runs > 1:
            result.problems.append(f"key {key} ran more than once: orders {sorted(named)}")
        elif len(named) < len(set(created)):
            result.problems.append(f"key {key}: a 201 without an order id")
        elif named:
            order_of[key] = named.pop()
    result.created = len(order_of)
    if len(set(order_of.values())) != len(order_of):
        result.problems.append("two keys were answered with the same order")
    return order_of


def check_books(
    keys: dict[str, Key],
    order_of: dict[str, int],
    *,
    database: Path,
    template: Path,
    users: Sequence[str],
    result: Audit,
) -> None:
    """Orders and stock in SQLite against the answered keys and the seeded stock."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        orders = {
            order_id: (user_id, status)
            for order_id, user_id, status in db.execute("SELECT id, user_id, status FROM orders")
        }
        items: dict[int, dict[int, int]] = {}
        for order_id, product_id, quantity in db.execute(
            "SELECT order_id, product_id, quantity FROM order_items"
        ):
            items.setdefault(order_id, {})[product_id] = quantity
        stock = dict(db.execute("SELECT id, stock FROM products").fetchall())
    with contextlib.closing(sqlite3.connect(f"file:{template}?mode=ro", uri=True)) as db:
        seeded = dict(db.execute("SELECT id, stock FROM products").fetchall())
    paid = {order_id for order_id, (_, status) in orders.items() if status == "paid"}
    result.paid = len(paid)
    pending = sum(1 for _, status in orders.values() if status == "pending")
    if pending:
        result.problems.append(f"{pending} orders left pending")
    told = set(order_of.values())
    if paid != told:
        result.problems.append(
            f"{len(paid)} paid orders in SQLite, {len(told)} keys answered 201 "
            f"({len(paid - told)} orders no client was told of)"
        )
    for key, order_id in order_of.items():
        user_id, _ = orders.get(order_id, (None, None))
        if user_id != users[keys[key].user]:
            result.problems.append(f"order {order_id} (key {key}) belongs to {user_id}")
        if items.get(order_id) != lines_of(keys[key].body):
            result.problems.append(f"order {order_id} does not hold the lines of key {key}")
    taken: Counter[int] = Counter()
    for order_id in paid:
        taken.update(items.get(order_id, {}))
    for product_id, left in stock.items():
        if left < 0 or left != seeded[product_id] - taken[product_id]:
            result.problems.append(
                f"product {product_id}: stock {left}, seeded {seeded[product_id]}, "
                f"{taken[product_id]} sold"
            )


# --- one shop, its runs -----------------------------------------------------------------------


def measure(
    shop: Shop,
    mix: str,
    seconds: float,
    warmup: float,
    *,
    workdir: Path,
    template: Path,
    seed: int,
    redis_client: redis.Redis | None,
) -> Run:
    products = products_in(template)
    logs = [workdir / f"logs-{mix}-{seed}-warm", workdir / f"logs-{mix}-{seed}"]
    for directory in logs:
        directory.mkdir()
    tokens_file = workdir / "tokens"
    tokens: list[tuple[str, str]] = []
    if mix == "order":
        tokens = login_all(shop.url)
        tokens_file.write_text("".join(f"{token}\n" for _, token in tokens))
    connections = len(ACCOUNTS) if mix == "order" else READ_CONNECTIONS

    def load(seconds: float, out: Path, seed: int) -> WrkResult:
        return wrk(
            shop.url,
            mix,
            seconds,
            products=products,
            out=out,
            tokens=tokens_file,
            seed=seed,
            pinned=shop.pinned,
            connections=connections,
        )

    load(warmup, logs[0], seed * 2)
    pids = shop.serving()
    cpu_before, started = cpu_seconds(pids), time.monotonic()
    result = load(seconds, logs[1], seed * 2 + 1)
    cores = (cpu_seconds(pids) - cpu_before) / (time.monotonic() - started)
    run = Run(
        per_second=result.requests / result.seconds,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        statuses=result.statuses,
        errors=result.errors,
        rss_mib=[rss_mib(pid) for pid in pids],
        cpu_cores=cores,
        redis_mib=None,
    )
    if redis_client is not None:
        run.redis_mib = int(redis_client.info("memory")["used_memory"]) / 2**20
    if mix == "order":
        keys = read_logs(logs)
        resent = resend_lost(shop.url, keys, tokens)
        shop.stop()  # the books are read once the shop has finished writing them
        run.audit = audit(
            keys, resent, shop.data / "shop.sqlite3", template, [u for u, _ in tokens]
        )
    return run


def seed_template(directory: Path, products: int) -> Path:
    path = directory / "template.sqlite3"
    database = Database(path, products=products)
    database.prepare()
    database.close()
    return path


def bench(
    configs: Sequence[Config],
    repeat: int,
    seconds: float,
    warmup: float,
    *,
    products: int,
    mixes: Sequence[str] = MIXES,
) -> dict[tuple[str, str], list[Run]]:
    """Run every configuration *repeat* times, alternating; the runs by (config, mix).

    The ``healthz`` ceiling is measured on the memory configuration only.
    """
    runs: dict[tuple[str, str], list[Run]] = {}
    with tempfile.TemporaryDirectory(prefix="shop-load-") as tmp, RedisServer() as server:
        workdir = Path(tmp)
        template = seed_template(workdir, products)
        client = redis.Redis.from_url(server.url)
        if pinning():
            info = client.info("server")
            pin(int(info["process_id"]), LOAD_CPU)
        try:
            for round_ in range(repeat):
                for config in configs:
                    if config.redis:
                        client.flushall()
                    print(f"{config.label}, run {round_ + 1}/{repeat}...", file=sys.stderr)
                    shop = Shop(
                        config, template, workdir / config.key, server.url if config.redis else None
                    )
                    try:
                        for mix in mixes:
                            if mix == "healthz" and config.key != "memory":
                                continue
                            run = measure(
                                shop,
                                mix,
                                seconds,
                                warmup,
                                workdir=workdir / config.key,
                                template=template,
                                seed=round_ * 10 + MIXES.index(mix),
                                redis_client=client if config.redis else None,
                            )
                            runs.setdefault((config.key, mix), []).append(run)
                    finally:
                        shop.stop()
        finally:
            client.close()
    return runs


# --- the report ------------------------------------------------------------------------------


def statuses_cell(runs: Sequence[Run]) -> str:
    total: Counter[int] = Counter()
    for run in runs:
        total.update(run.statuses)
    return ", ".join(f"{status}: {n:,}" for status, n in sorted(total.items()))


def sections(
    configs: Sequence[Config], runs: dict[tuple[str, str], list[Run]]
) -> tuple[Section, Section | None]:
    ceiling = runs.get(("memory", "healthz"))
    ceiling_rate = statistics.median(r.per_second for r in ceiling) if ceiling else None
    rows: list[list[Cell]] = []
    raw: dict[str, dict[str, list[float]]] = {}
    for mix in MIXES:
        for config in configs:
            measured = runs.get((config.key, mix))
            if not measured:
                continue
            label = f"{config.label}, {mix}"
            rate = statistics.median(r.per_second for r in measured)
            redis_mib = [r.redis_mib for r in measured if r.redis_mib is not None]
            rss = [sum(r.rss_mib) for r in measured]
            rows.append(
                [
                    label,
                    rate,
                    f"{rate / ceiling_rate:.2f}x" if ceiling_rate else "-",
                    statistics.median(r.p50_ms for r in measured),
                    statistics.median(r.p99_ms for r in measured),
                    statuses_cell(measured),
                    sum(r.non_2xx for r in measured) + sum(r.errors for r in measured),
                    " + ".join(f"{mib:.0f}" for mib in measured[len(measured) // 2].rss_mib),
                    statistics.median(redis_mib) if redis_mib else "-",
                    statistics.median(r.cpu_cores for r in measured),
                ]
            )
            raw[label] = {
                "requests/s": [r.per_second for r in measured],
                "p50 ms": [r.p50_ms for r in measured],
                "p99 ms": [r.p99_ms for r in measured],
                "non-2xx": [float(r.non_2xx + r.errors) for r in measured],
                "app RSS MiB": rss,
                "app CPU cores": [r.cpu_cores for r in measured],
                **({"Redis used_memory MiB": redis_mib} if redis_mib else {}),
            }
    load = Section(
        key="load",
        title="Requests per second and latency",
        headers=[
            "configuration, mix",
            "requests/s",
            "vs /healthz ceiling",
            "p50 ms",
            "p99 ms",
            "statuses (all runs)",
            "non-2xx + socket errors (all runs)",
            "app RSS MiB (per process)",
            "Redis used_memory MiB",
            "app CPU (cores)",
        ],
        rows=rows,
        raw=raw,
        chart=[1],
    )
    audit_rows: list[list[Cell]] = []
    for config in configs:
        measured = runs.get((config.key, "order"))
        if not measured:
            continue
        audits = [r.audit for r in measured if r.audit is not None]
        exact = sum(1 for a in audits if a.exact)
        failures = [a.summary() for a in audits if not a.exact]
        audit_rows.append(
            [
                config.label,
                sum(a.keys for a in audits),
                sum(a.created for a in audits),
                sum(a.paid for a in audits),
                sum(a.replayed for a in audits),
                sum(a.resent for a in audits),
                f"exact in {exact}/{len(audits)} runs" + (f"; {failures[0]}" if failures else ""),
            ]
        )
    audit_section = None
    if audit_rows:
        audit_section = Section(
            key="audit",
            title="Order audit (all runs)",
            headers=[
                "configuration",
                "keys sent",
                "keys answered 201",
                "paid orders in SQLite",
                "201s replayed",
                "keys resent after the run",
                "audit",
            ],
            rows=audit_rows,
        )
    return load, audit_section


def setup_notes(pinned: bool, seconds: float, warmup: float, products: int) -> list[str]:
    cores = os.cpu_count()
    if pinned:
        where = (
            f"A one-process shop is pinned to CPU {SHOP_CPU}; wrk (one thread for reads, one "
            f"per customer for orders), Redis and the payment provider to CPU {LOAD_CPU}. "
            f"The two-process shop may use both CPUs, so on this {cores}-core machine its "
            "second worker shares a CPU with the load generator and Redis: that row shows "
            "what two processes on one Redis cost and that they stay one shop (the audit), "
            "not how far the shop scales out."
        )
    else:
        where = (
            f"Nothing is pinned (taskset or two CPUs unavailable): on this {cores}-core "
            "machine the shop, wrk, Redis and the payment provider share every CPU, so the "
            "load generator takes CPU time from the shop."
        )
    return [
        f"- the shop: `python -m examples.ecommerce` (uvicorn, SQLite in WAL mode, "
        f"{products:,} products), its payment provider a separate process (50 ms a charge); "
        "Redis a dedicated `redis-server` on a free port, flushed before each run;",
        f"- wrk with `benchmarks/ecommerce_load.lua`: {warmup:g} s of warm-up, then "
        f"{seconds:g} s measured; reads over {READ_CONNECTIONS} connections from "
        f"{CLIENTS:,} client addresses, orders over one connection per account "
        f"({len(ACCOUNTS)}), {REPLAYS:.0%} of them resending an earlier key;",
        f"- {where}",
        "- each shop serves the reads, then the orders; app RSS: resident memory of its "
        "serving processes after the run; Redis `used_memory`: after the run, so the order "
        "row includes what the reads left; app CPU: CPU seconds the serving processes used "
        "per second of the run (1.00 = one core busy);",
        "- a 409 in the order mix is an order refused for want of stock (2% of the products "
        "are seeded with none, and stock runs down), or the replay of one: the shop refusing "
        "to oversell, not failing.",
    ]


async def main_async(args: argparse.Namespace) -> Report:
    if shutil.which("wrk") is None:
        msg = "wrk is not installed: `apt-get install wrk` to run this benchmark"
        raise SystemExit(msg)
    if args.quick:
        args.repeat = 1
    seconds, warmup = (2.0, 1.0) if args.quick else (10.0, 2.0)
    products = 500 if args.quick else 5000
    configs = [c for c in CONFIGS if not args.only or c.key in args.only]
    machine = Machine.probe(PACKAGES, find_redis_server())
    runs = bench(configs, args.repeat, seconds, warmup, products=products)
    notes = setup_notes(pinning(), seconds, warmup, products)
    load, audit_section = sections(configs, runs)
    load = dataclasses.replace(load, note="\n".join(notes))
    parts = ["# The example shop under load", "", "## Machine", "", machine.markdown(), ""]
    parts += ["## Setup", "", *notes, ""]
    parts += [f"## {load.title}", "", load.markdown(), ""]
    found = [load]
    if audit_section is not None:
        found.append(audit_section)
        parts += [f"## {audit_section.title}", "", audit_section.markdown(), ""]
    parts.append(
        f"Medians of {args.repeat} runs. Rerun: `python dev.py bench ecommerce_load"
        f"{' --quick' if args.quick else ''} --repeat {args.repeat}`."
    )
    return Report(markdown="\n".join(parts), machine=machine, sections=found)


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        "ecommerce_load", __doc__, main_async, argv, sections=tuple(c.key for c in CONFIGS)
    )


if __name__ == "__main__":
    sys.exit(main())
