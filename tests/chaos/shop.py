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
from collections.abc import Awaitable, Callable
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
BLOCKS = ("read", "login", "order")  # what the recovery's probe tries
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
            # The library of this tree, not whichever one the interpreter has installed.
            "PYTHONPATH": os.pathsep.join((str(ROOT / "src"), str(ROOT))),
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
            self._order_on_every_worker()
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

    def _order_on_every_worker(self) -> None:
        """Order until each worker has run an order: a worker learns the idempotency
        store's marker with its first claim, and one that never claimed before Redis
        restarted empty cannot tell the loss (the library's documented limit)."""
        deadline = time.monotonic() + 60
        while len({run.pid for found in self.runs("warm-").values() for run in found}) < WORKERS:
            if time.monotonic() > deadline:
                msg = f"orders did not reach all {WORKERS} shop workers"
                raise TimeoutError(msg)
            n = random.randrange(len(self.tokens))
            with httpx.Client(base_url=self.url, timeout=30) as client:  # a new connection
                response = client.post(
                    "/api/orders",
                    json={"items": [{"product_id": n + 1, "quantity": 1}]},
                    headers={
                        "Authorization": f"Bearer {self.tokens[n]}",
                        "Idempotency-Key": f"warm-{uuid.uuid4().hex[:16]}",
                    },
                )
            if response.status_code not in (201, 409):  # 409: out of stock
                response.raise_for_status()

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

    def log_since(self, offset: int) -> str:
        """What the shop's processes wrote to stderr after *offset* bytes."""
        self._stderr.flush()
        return self.stderr_path.read_bytes()[offset:].decode(errors="replace")

    def runs(self, prefix: str) -> dict[str, list[Run]]:
        """The order handler's runs for keys starting with *prefix*, by key, in order."""
        runs: dict[str, list[Run]] = {}
        if not self.run_log.exists():
            return runs
        for line in self.run_log.read_text().splitlines():
            entry = json.loads(line)
            key = entry.get("key") or ""
            if key.startswith(prefix):
                run = Run(
                    float(entry["began"]), float(entry["at"]), int(entry["status"]), entry["pid"]
                )
                runs.setdefault(key, []).append(run)
        for found in runs.values():
            found.sort(key=lambda run: run.began)
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


@dataclass(frozen=True)
class Run:
    """One run of the order handler, from the shop's run log (Unix times, seconds)."""

    began: float
    ended: float
    status: int
    pid: int


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

    def unexpected(self, since: float) -> list[str]:
        """Answers the shop must never give: 5xx other than a documented 503, no answer.

        An order whose response the idempotency store could not keep is answered 503
        with ``Retry-After`` and ``Idempotency-Stored: false`` (documented), so an order
        without an answer is a failure like any other request's.
        """
        found = []
        errors = sorted(
            a.answered for found in self.answers.values() for a in found if a.status == 500
        )
        for kind, answers in self.answers.items():
            for a in answers:
                if a.status is None:
                    # uvicorn closes a connection after an exception escaped the app: a
                    # request sent on it just then gets none (the 500 is the cause). The
                    # 500's answer is timed once read, after its connection went back to
                    # the pool, so another request may take it a little before.
                    near = [a.sent - at for at in errors if -0.05 <= a.sent - at < 0.1]
                    cause = (
                        f"; sent {min(near, key=abs):+.3f} s from a 500's answer" if near else ""
                    )
                    found.append(
                        f"{kind}: no answer ({a.error}), sent {a.sent - since:+.2f} s, "
                        f"failed {a.answered - since:+.2f} s from the fault's start{cause}"
                    )
                elif a.status not in EXPECTED:
                    found.append(
                        f"{kind}: {a.status} {a.body[:200]!r}, sent {a.sent - since:+.2f} s, "
                        f"answered {a.answered - since:+.2f} s from the fault's start"
                    )
                elif a.status == 503 and not _documented_503(a):
                    found.append(f"{kind}: undocumented 503 {a.body[:200]!r}")
        return found

    def refusals(self) -> Counter[str]:
        """The 503s of the run by cause (each a documented refusal, see ``cause_of_503``)."""
        return Counter(
            cause_of_503(a) for answers in self.answers.values() for a in answers if a.status == 503
        )


def cause_of_503(answer: Answer) -> str:
    """Which documented refusal a 503 is, from its problem body and headers."""
    body = answer.body
    if answer.headers is not None and answer.headers.get("idempotency-stored") == "false":
        return "response not stored"
    if b"lost its records" in body:
        return "quarantine"
    if b"idempotency store is unavailable" in body:
        return "idempotency store unavailable"
    if b"payment" in body:
        return "payments unavailable"
    return "other"


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
    rounds: dict[str, int] = field(default_factory=dict)  # the tries each block took

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


async def probe_latency(load: Load, rounds: int = 3) -> dict[str, float]:
    """The median time each probe (a read, a login, an order, sent at once) takes now."""
    times: dict[str, list[float]] = {block: [] for block in BLOCKS}
    for n in range(rounds):
        ip = f"10.251.{load.seed % 250}.{n + 1}"

        async def timed(block: str, probe: Awaitable[bool]) -> None:
            started = time.monotonic()
            await probe
            times[block].append(time.monotonic() - started)

        await asyncio.gather(
            timed("read", probe_read(load, n, ip)),
            timed("login", probe_login(load, ip)),
            timed("order", probe_order(load)),
        )
    return {block: sorted(found)[len(found) // 2] for block, found in times.items()}


async def probe_recovery(load: Load, fault_end: float, give_up: float = 20.0) -> Probe:
    """Probe a read, a login and an order, each every 50 ms from *fault_end* (each on its
    own, so that a slow one does not delay the others) until it has served normally: its
    usual status, the rate limiter's headers (its store decided), and for the order a
    stored response (201, or 409 out of stock). Times are seconds from *fault_end* until
    the answer."""
    probe = Probe()

    async def until_served(block: str, attempt: Callable[[int], Awaitable[bool]]) -> None:
        n = 0
        while time.monotonic() - fault_end < give_up:
            n += 1
            passed = await attempt(n)
            if passed:
                setattr(probe, block, time.monotonic() - fault_end)
                probe.rounds[block] = n
                return
            await asyncio.sleep(0.05)

    def address(n: int) -> str:
        return f"10.250.{n // 250}.{n % 250 + 1}"

    await asyncio.gather(
        until_served("read", lambda n: probe_read(load, n, address(n))),
        until_served("login", lambda n: probe_login(load, address(n + 1000))),
        until_served("order", lambda n: probe_order(load)),
    )
    return probe


@dataclass(frozen=True)
class Readiness:
    """One answer of the shop's ``GET /readyz``."""

    at: float  # monotonic seconds, when answered
    status: int | None  # None: no answer
    idempotency: str  # its idempotency check ("quarantined for ..."), "" when absent


async def watch_readiness(url: str, until: float, every: float = 0.1) -> list[Readiness]:
    """Ask the shop's ``/readyz`` every *every* seconds until *until* (monotonic), each
    time on a new connection, so that the answers come from either worker."""
    found = []
    while time.monotonic() < until:
        async with httpx.AsyncClient(base_url=url, timeout=5.0) as client:
            try:
                response = await client.get("/readyz")
            except httpx.HTTPError:
                found.append(Readiness(time.monotonic(), None, ""))
            else:
                checks = response.json().get("checks", {})
                found.append(
                    Readiness(
                        time.monotonic(), response.status_code, str(checks.get("idempotency", ""))
                    )
                )
        await asyncio.sleep(every)
    return found
