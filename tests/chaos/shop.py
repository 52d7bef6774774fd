"""The chaos suite's shop and its load: real worker processes, real HTTP, a ledger of
every answer, and the audit that counts handler runs and admissions afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from examples.ecommerce.__main__ import wait_until_up
from examples.ecommerce.db import SEEDED_CUSTOMERS

ROOT = Path(__file__).resolve().parents[2]
WORKERS = 2
PRODUCTS = 500
# The shop's idempotency lease in the suite (SHOP_IDEMPOTENCY_LEASE): longer than each
# fault's outage (a failover takes 2-3 s), so that a response the store could not keep
# during the fault can still be stored after it, and short, since the audit waits it out.
LEASE = 5.0
LOGIN_IP_LIMIT = 20  # the shop's login form: 20/minute per client address
# Statuses the shop may answer under faults. 503 only as a documented refusal: a problem
# body with Retry-After (idempotency store unavailable, payments unavailable).
EXPECTED = frozenset({200, 201, 401, 404, 409, 422, 429, 503})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ShopProcesses:
    """``python -m examples.ecommerce --workers 2`` on *redis_url*, its stderr in a file."""

    def __init__(self, redis_url: str, workdir: Path) -> None:
        self.port, self.payment_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.run_log = workdir / "runs.jsonl"
        self.stderr_path = workdir / "shop.stderr"
        workdir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "REDIS_URL": redis_url,
            "SHOP_DATA_DIR": str(workdir / "data"),
            "SHOP_PRODUCTS": str(PRODUCTS),
            "SHOP_TRUSTED_PROXIES": "127.0.0.1/32",
            "SHOP_IDEMPOTENCY_LEASE": str(LEASE),
            "SHOP_RUN_LOG": str(self.run_log),
        }
        self._stderr = self.stderr_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "examples.ecommerce", "--port", str(self.port),
             "--payment-port", str(self.payment_port), "--workers", str(WORKERS),
             "--payment-latency", "0.1"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )  # fmt: skip
        self.users: list[str] = []  # the customers' ids, by the index of their token
        try:
            wait_until_up(f"{self.url}/healthz", timeout=60)
            self._wait_for_workers()
            self.tokens = self._login_customers()
        except BaseException:
            self.stop()
            raise

    def _wait_for_workers(self) -> None:
        deadline = time.monotonic() + 60
        seen: set[int] = set()
        while len(seen) < WORKERS:
            if time.monotonic() > deadline:
                msg = f"only {len(seen)} of {WORKERS} shop workers answered"
                raise TimeoutError(msg)
            with httpx.Client(base_url=self.url) as client:  # a new connection each time
                seen.add(client.get("/healthz").json()["process"])

    def _login_customers(self) -> list[str]:
        tokens = []
        with httpx.Client(base_url=self.url, timeout=30) as client:
            for n in range(1, SEEDED_CUSTOMERS + 1):
                response = client.post(
                    "/api/login",
                    json={"username": f"customer{n:03d}", "password": f"password-{n}"},
                    headers={"X-Forwarded-For": f"192.0.2.{n}"},
                )
                response.raise_for_status()
                tokens.append(response.json()["access_token"])
                self.users.append(response.json()["user_id"])
        return tokens

    def stderr_size(self) -> int:
        self._stderr.flush()
        return self.stderr_path.stat().st_size

    def tracebacks_since(self, offset: int) -> list[str]:
        """The exceptions the shop's processes printed with a traceback to stderr after
        *offset* bytes: the last exception of each chain."""
        self._stderr.flush()
        lines = self.stderr_path.read_bytes()[offset:].decode(errors="replace").splitlines()
        found = []
        inside = False
        for n, line in enumerate(lines):
            if line.startswith("Traceback (most recent call last):"):
                inside = True
            elif inside and line.strip() and not line.startswith(" "):
                inside = False
                following = next((rest for rest in lines[n + 1 :] if rest.strip()), "")
                if not following.startswith(("The above exception", "During handling")):
                    found.append(line.strip())
        return found

    def runs(self, prefix: str) -> dict[str, list[tuple[float, int]]]:
        """The order handler's runs for keys starting with *prefix*: key -> (time, status)."""
        runs: dict[str, list[tuple[float, int]]] = {}
        if not self.run_log.exists():
            return runs
        for line in self.run_log.read_text().splitlines():
            entry = json.loads(line)
            key = entry.get("key") or ""
            if key.startswith(prefix):
                runs.setdefault(key, []).append((float(entry["at"]), int(entry["status"])))
        return runs

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._stderr.close()


@dataclass
class Answer:
    """One answer (or failure) to one request."""

    sent: float
    answered: float
    status: int | None  # None: no answer (a transport error)
    headers: httpx.Headers | None = None
    body: bytes = b""
    error: str = ""

    @property
    def limited(self) -> bool:
        """Whether a rate limit's store decided (headers present; fail-open sends none)."""
        return self.headers is not None and "ratelimit" in self.headers


@dataclass
class OrderKey:
    """An idempotency key and every answer it got."""

    user: int
    body: dict[str, object]
    answers: list[Answer] = field(default_factory=list)


@dataclass
class Ledger:
    """Everything one run sent and got back."""

    prefix: str
    answers: dict[str, list[Answer]] = field(default_factory=dict)  # by kind of request
    orders: dict[str, OrderKey] = field(default_factory=dict)
    attackers: dict[str, list[Answer]] = field(default_factory=dict)  # by client address

    def add(self, kind: str, answer: Answer) -> None:
        self.answers.setdefault(kind, []).append(answer)

    def statuses(self) -> Counter[str]:
        """Answers by status ("error" for none), every kind of request together."""
        counts: Counter[str] = Counter()
        for answers in self.answers.values():
            counts.update(str(a.status) if a.status is not None else "error" for a in answers)
        return counts

    def unexpected(self, withheld: tuple[float, float]) -> list[str]:
        """Answers the shop must never give: 5xx other than a documented 503, no answer.

        An order that failed without an answer within *withheld* (monotonic seconds: from
        the fault's start until its end plus the lease) is the documented outcome of a
        response the idempotency store could not keep (its end is withheld, so that the
        client never takes for a success what may run again): not counted here, but in
        the handler's runs per key.
        """
        found = []
        for kind, answers in self.answers.items():
            for a in answers:
                if a.status is None:
                    if kind in ("order", "probe") and withheld[0] <= a.answered <= withheld[1]:
                        continue
                    found.append(f"{kind}: no answer ({a.error})")
                elif a.status not in EXPECTED:
                    found.append(f"{kind}: {a.status} {a.body[:200]!r}")
                elif a.status == 503 and not _documented_503(a):
                    found.append(f"{kind}: undocumented 503 {a.body[:200]!r}")
        return found


def _documented_503(answer: Answer) -> bool:
    headers = answer.headers
    return (
        headers is not None
        and headers.get("content-type", "").startswith("application/problem+json")
        and "retry-after" in headers
    )


class Load:
    """The mixed load of one run: catalog reads, logins, orders (a share resending an
    earlier key) and login-form attackers, from many client addresses sent in
    ``X-Forwarded-For`` by a trusted proxy (the test, on loopback)."""

    READERS = 4
    ORDERERS = 6
    RESEND = 0.15  # share of order requests that resend an earlier key
    ATTACKERS = 8
    ATTEMPTS = 24  # per attacker, every 0.05 s: more than the limit, within 3 s

    def __init__(self, shop: ShopProcesses, prefix: str, seed: int) -> None:
        self.shop = shop
        self.ledger = Ledger(prefix)
        self.rng = random.Random(seed)
        self.seed = seed
        self.stopping = asyncio.Event()
        self.client = httpx.AsyncClient(
            base_url=shop.url,
            timeout=httpx.Timeout(15.0),
            limits=httpx.Limits(max_connections=48, max_keepalive_connections=48),
        )
        self.tasks: list[asyncio.Task[None]] = []

    async def request(self, kind: str, method: str, path: str, **kwargs: object) -> Answer:
        sent = time.monotonic()
        try:
            response = await self.client.request(method, path, **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            answer = Answer(sent, time.monotonic(), None, error=f"{type(exc).__name__}: {exc}")
        else:
            answer = Answer(
                sent, time.monotonic(), response.status_code, response.headers, response.content
            )
        self.ledger.add(kind, answer)
        return answer

    def address(self) -> str:
        n = self.rng.randrange(1, 60_000)
        return f"10.{100 + self.seed % 100}.{n // 250}.{n % 250 + 1}"

    def start(self, attack_span: float) -> None:
        """Start every client; attackers start spread over *attack_span* seconds."""
        spawn = asyncio.get_running_loop().create_task
        self.tasks += [spawn(self._reader()) for _ in range(self.READERS)]
        self.tasks += [spawn(self._orderer(n)) for n in range(self.ORDERERS)]
        self.tasks.append(spawn(self._logins()))
        for n in range(self.ATTACKERS):
            delay = attack_span * n / max(1, self.ATTACKERS - 1)
            ip = f"10.{200 + self.seed % 50}.{n}.1"
            self.tasks.append(spawn(self._attacker(ip, delay)))

    async def stop(self) -> None:
        self.stopping.set()
        await asyncio.gather(*self.tasks)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _reader(self) -> None:
        while not self.stopping.is_set():
            headers = {"X-Forwarded-For": self.address()}
            if self.rng.random() < 0.5:
                path = f"/api/products/{self.rng.randrange(1, PRODUCTS + 1)}"
            else:
                path = f"/api/products?page={self.rng.randrange(1, 4)}"
            await self.request("read", "GET", path, headers=headers)

    async def _logins(self) -> None:
        while not self.stopping.is_set():
            n = self.rng.randrange(1, SEEDED_CUSTOMERS + 1)
            await self.request(
                "login",
                "POST",
                "/api/login",
                json={"username": f"customer{n:03d}", "password": f"password-{n}"},
                headers={"X-Forwarded-For": self.address()},
            )
            await asyncio.sleep(0.05)

    async def order(self, key: str, entry: OrderKey, kind: str = "order") -> Answer:
        headers = {
            "Authorization": f"Bearer {self.shop.tokens[entry.user]}",
            "Idempotency-Key": key,
        }
        answer = await self.request(kind, "POST", "/api/orders", json=entry.body, headers=headers)
        entry.answers.append(answer)
        return answer

    def new_key(self, user: int | None = None) -> tuple[str, OrderKey]:
        key = f"{self.ledger.prefix}{uuid.uuid4().hex[:16]}"
        product = self.rng.randrange(1, PRODUCTS + 1)
        entry = OrderKey(
            user=self.rng.randrange(len(self.shop.tokens)) if user is None else user,
            body={"items": [{"product_id": product, "quantity": 1}]},
        )
        self.ledger.orders[key] = entry
        return key, entry

    async def _orderer(self, n: int) -> None:
        mine: list[str] = []
        while not self.stopping.is_set():
            if mine and self.rng.random() < self.RESEND:
                key = self.rng.choice(mine)
                entry = self.ledger.orders[key]
            else:
                key, entry = self.new_key()
                mine.append(key)
            await self.order(key, entry)

    async def _attacker(self, ip: str, delay: float) -> None:
        await asyncio.sleep(delay)
        attempts = self.ledger.attackers.setdefault(ip, [])
        for n in range(self.ATTEMPTS):
            answer = await self.request(
                "attack",
                "POST",
                "/api/login",
                json={"username": f"nobody-{ip}-{n}", "password": "guess"},
                headers={"X-Forwarded-For": ip},
            )
            attempts.append(answer)
            await asyncio.sleep(0.05)

    async def resend_every_key(self) -> None:
        """Send every key of the run once more, as a client retrying would."""
        semaphore = asyncio.Semaphore(16)

        async def resend(key: str, entry: OrderKey) -> None:
            async with semaphore:
                await self.order(key, entry, kind="resend")

        await asyncio.gather(*(resend(k, e) for k, e in list(self.ledger.orders.items())))


@dataclass
class Probe:
    """When each block served normally again after a fault's end."""

    read: float | None = None
    login: float | None = None
    order: float | None = None
    rounds: int = 0

    @property
    def all(self) -> float | None:
        times = (self.read, self.login, self.order)
        return None if None in times else max(t for t in times if t is not None)


async def probe_read(load: Load, n: int, ip: str) -> bool:
    answer = await load.request(
        "probe", "GET", f"/api/products/{n % PRODUCTS + 1}", headers={"X-Forwarded-For": ip}
    )
    return answer.status == 200 and answer.limited


async def probe_login(load: Load, ip: str) -> bool:
    answer = await load.request(
        "probe",
        "POST",
        "/api/login",
        json={"username": "carol", "password": "christmas"},
        headers={"X-Forwarded-For": ip},
    )
    return answer.status == 200 and answer.limited


async def probe_order(load: Load) -> bool:
    key, entry = load.new_key(user=0)
    answer = await load.order(key, entry, kind="probe")
    stored = answer.headers is not None and "idempotency-stored" not in answer.headers
    return answer.status in (201, 409) and answer.limited and stored


async def probe_latency(load: Load, rounds: int = 3) -> float:
    """The median time a probe round (a read, a login, an order at once) takes now."""
    times = []
    for n in range(rounds):
        started = time.monotonic()
        ip = f"10.251.{load.seed % 250}.{n + 1}"
        await asyncio.gather(probe_read(load, n, ip), probe_login(load, ip), probe_order(load))
        times.append(time.monotonic() - started)
    return sorted(times)[len(times) // 2]


async def probe_recovery(load: Load, fault_end: float, give_up: float = 20.0) -> Probe:
    """Probe a read, a login and an order every 50 ms from *fault_end* until each has
    served normally: its usual status, the rate limiter's headers (its store decided),
    and for the order a stored response (201, or 409 out of stock). Times are seconds
    from *fault_end* until the answer."""
    probe = Probe()
    n = 0
    while probe.all is None and time.monotonic() - fault_end < give_up:
        n += 1
        probe.rounds += 1
        ip = f"10.250.{n // 250}.{n % 250 + 1}"
        ok = await asyncio.gather(probe_read(load, n, ip), probe_login(load, ip), probe_order(load))
        now = time.monotonic() - fault_end
        for name, passed in zip(("read", "login", "order"), ok, strict=True):
            if passed and getattr(probe, name) is None:
                setattr(probe, name, now)
        await asyncio.sleep(0.05)
    return probe
