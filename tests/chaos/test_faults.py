"""The chaos suite: the example shop, two worker processes on Redis, under a mixed load,
through one fault per run; what each block promised is counted and asserted.

For each fault: the answers by status (no 5xx but the documented 503s, always an answer,
no traceback on the shop's stderr), the handler's runs per idempotency key (exactly one,
except keys whose record Redis provably lost, reported), what the login form admitted per
client address (exactly the limit; plus what Redis forgot when it lost data, reported),
and how long after the fault's end each block served normally again (at most 1 s, plus
the node timeout on the cluster). The figures go to ``benchmarks/results/faults.md``.
Run it alone with ``python3 dev.py test -m chaos``.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import redis
from redis.crc import key_slot

from resilient.testing import RedisCluster, RedisServer
from tests.chaos.conftest import NODE_TIMEOUT
from tests.chaos.proxy import ChaosProxy
from tests.chaos.report import Admission, FaultReport
from tests.chaos.shop import (
    LEASE,
    LOGIN_IP_LIMIT,
    Answer,
    Load,
    ShopProcesses,
    probe_latency,
    probe_recovery,
)

pytestmark = [pytest.mark.chaos, pytest.mark.redis, pytest.mark.slow]

WARMUP = 1.0  # seconds of load before the fault
TAIL = 1.5  # seconds of load after the blocks recovered
ATTACK_SPAN = 2.5  # attackers start spread over this many seconds
RECOVERY = 1.0  # seconds allowed from a fault's end until every block serves normally


@dataclass
class Window:
    """When a fault happened (monotonic seconds), and what it cost Redis."""

    start: float
    end: float
    lost_at: float | None = None  # when Redis lost its data (None: it lost nothing)
    lost_slots: list[tuple[int, int]] | None = None  # only these slots (None: all)
    notes: list[str] = field(default_factory=list)


Inject = Callable[[], Awaitable[Window]]


async def run_fault(
    shop: ShopProcesses,
    name: str,
    what: str,
    inject: Inject,
    *,
    seed: int,
    bound: float,
    records: redis.RedisCluster | None = None,
) -> FaultReport:
    """Load the shop, inject the fault, probe the recovery, audit; return the figures."""
    began = time.monotonic()
    offset = shop.stderr_size()
    load = Load(shop, prefix=f"{name.split(maxsplit=1)[0].lower().strip(':')}{seed}-", seed=seed)
    report = FaultReport(name=name, what=what, limit=LOGIN_IP_LIMIT, bound=bound)
    try:
        load.start(ATTACK_SPAN)
        await asyncio.sleep(WARMUP)
        # The probe's own latency under this load, so the recovery counts only the fault.
        baseline = await probe_latency(load)
        window = await inject()
        probe = await probe_recovery(load, window.end)
        report.recovery = {
            name: None if value is None else max(0.0, value - baseline)
            for name, value in (
                ("read", probe.read),
                ("login", probe.login),
                ("order", probe.order),
            )
        }
        report.notes.append(
            f"recovery: the probe's answer after the fault's end, less the probe's latency "
            f"under the same load just before the fault ({baseline:.2f} s); "
            f"probe rounds: {probe.rounds}"
        )
        await asyncio.sleep(TAIL)
        await load.stop()
        # A record whose run stopped renewing it is free again after the lease: every key
        # sent once more shows whether the handler would run it a second time.
        await asyncio.sleep(LEASE + 0.5)
        await load.resend_every_key()
    finally:
        await load.aclose()
    report.notes += window.notes
    ledger = load.ledger
    report.statuses = {
        kind: Counter("error" if a.status is None else str(a.status) for a in answers)
        for kind, answers in ledger.answers.items()
    }
    withheld = (window.start, window.end + LEASE + 1.0)
    report.failures += [f"5xx or no answer: {u}" for u in ledger.unexpected(withheld)]
    report.failures += [f"traceback on stderr: {t}" for t in shop.tracebacks_since(offset)]
    audit_runs(shop, load, window, report)
    audit_admissions(load, window, report)
    if records is not None:
        report.failures += check_record_names(load, window, records)
    if any(value is None or value > bound for value in report.recovery.values()):
        slow = {k: None if v is None else round(v, 2) for k, v in report.recovery.items()}
        report.failures.append(f"recovery over {bound:g} s: {slow}")
    report.seconds = time.monotonic() - began
    return report


def record_slot(user: str, key: str) -> int:
    """The cluster slot of a key's idempotency record: ``shop:idem:{digest}:r``, where the
    digest is the SHA-256 of the middleware's default scope (user, method, path, key)."""
    return key_slot(record_digest(user, key).encode())


def record_digest(user: str, key: str) -> str:
    scoped = f"user:{user}\x1fPOST\x1f/api/orders\x1f{key}"
    return hashlib.sha256(scoped.encode()).hexdigest()[:32]


def check_record_names(load: Load, window: Window, client: redis.RedisCluster) -> list[str]:
    """The slots of lost records are computed from the records' names: check the names
    against the keys stored after the fault, so that a change of format shows here."""
    done = [
        (key, entry)
        for key, entry in load.ledger.orders.items()
        if any(a.status == 201 and a.sent > window.end for a in entry.answers)
    ][:20]
    missing = [
        key
        for key, entry in done
        if not client.exists(f"shop:idem:{{{record_digest(load.shop.users[entry.user], key)}}}:r")
    ]
    if done and missing:
        return [f"record names: {len(missing)} of {len(done)} records not found, e.g. {missing[0]}"]
    return []


def audit_runs(shop: ShopProcesses, load: Load, window: Window, report: FaultReport) -> None:
    """Count the handler's runs per key: exactly one that ended below 500 (a 5xx releases
    the key, so the client may run it again); two only where Redis lost the first record."""
    runs = shop.runs(load.ledger.prefix)
    lost_at_wall = None
    if window.lost_at is not None:
        lost_at_wall = time.time() - (time.monotonic() - window.lost_at)
    report.keys = len(load.ledger.orders)
    for key, entry in load.ledger.orders.items():
        stored = [(at, status) for at, status in runs.get(key, []) if status < 500]
        report.runs[len(stored)] += 1
        if len(stored) == 1:
            continue
        if len(stored) == 2 and lost_at_wall is not None and stored[0][0] < lost_at_wall:
            slot = record_slot(shop.users[entry.user], key)
            if window.lost_slots is None or any(a <= slot <= b for a, b in window.lost_slots):
                report.lost.append(key)
                continue
        start_wall = time.time() - (time.monotonic() - window.start)
        when = [f"{status} at {at - start_wall:+.2f} s" for at, status in runs.get(key, [])]
        where = ""
        if window.lost_slots is not None:
            slot = record_slot(shop.users[entry.user], key)
            on = any(a <= slot <= b for a, b in window.lost_slots)
            where = f"; record in slot {slot}, {'on' if on else 'off'} the lost master"
        report.failures.append(
            f"handler runs per key not 1: {key} ran {len(stored)} times (runs {when} from "
            f"the fault's start{where}); answers {[describe(a) for a in entry.answers]}"
        )


def describe(answer: Answer) -> str:
    if answer.status is None:
        return f"no answer ({answer.error})"
    replayed = answer.headers is not None and "idempotent-replayed" in answer.headers
    stored = answer.headers is not None and answer.headers.get("idempotency-stored")
    return (
        f"{answer.status}{' replayed' if replayed else ''}{' stored=' + stored if stored else ''}"
    )


def login_policy_decided(answer: Answer) -> bool:
    """Whether the login form's limit (20/minute) decided: its policy is in the headers."""
    headers = answer.headers
    return headers is not None and "20;w=60" in headers.get("ratelimit-policy", "")


def audit_admissions(load: Load, window: Window, report: FaultReport) -> None:
    """What the login form admitted per address: exactly the limit when the store decided
    every attempt; with attempts admitted while the store failed, at most the limit by the
    store and at least the limit in all; plus what the store forgot when it lost data."""
    limit = LOGIN_IP_LIMIT
    for ip, attempts in load.ledger.attackers.items():
        admitted = [a for a in attempts if a.status == 401 and login_policy_decided(a)]
        unguarded = [a for a in attempts if a.status == 401 and not login_policy_decided(a)]
        denied = [a for a in attempts if a.status == 429]
        forgotten = 0
        if window.lost_at is not None:
            forgotten = sum(1 for a in admitted if a.sent < window.lost_at)
        report.admissions.append(
            Admission(ip, len(admitted), len(unguarded), len(denied), forgotten)
        )
        if len(admitted) > limit + forgotten:
            report.failures.append(
                f"admitted per key not the limit: {ip} {len(admitted)} admitted by the store, "
                f"over the limit {limit}" + (f" + {forgotten} forgotten" if forgotten else "")
            )
        elif not unguarded and not forgotten and len(admitted) != limit:
            report.failures.append(
                f"admitted per key not the limit: {ip} {len(admitted)} admitted, not {limit}"
            )
        elif len(admitted) + len(unguarded) < limit:
            report.failures.append(
                f"admitted per key not the limit: {ip} {len(admitted)} + {len(unguarded)} "
                f"unguarded admitted, under {limit}"
            )


def check(report: FaultReport, reports: list[FaultReport]) -> None:
    reports.append(report)
    print(f"\n{report.markdown()}")  # the figures, seen with -s
    assert not report.failures, "\n".join(report.failures[:40])


# --- the faults on a standalone Redis ---------------------------------------------------


def standalone(
    redis_behind_proxy: tuple[RedisServer, ChaosProxy],
) -> tuple[RedisServer, ChaosProxy, redis.Redis]:
    server, proxy = redis_behind_proxy
    return server, proxy, redis.Redis(host=server.host, port=server.port)


async def test_kill_9_and_restart_empty(
    shop: ShopProcesses,
    redis_behind_proxy: tuple[RedisServer, ChaosProxy],
    reports: list[FaultReport],
) -> None:
    server, _, _ = standalone(redis_behind_proxy)

    async def inject() -> Window:
        start = time.monotonic()
        await asyncio.to_thread(server.kill)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(server.start)
        return Window(start, time.monotonic(), lost_at=start, notes=["Redis down for 1 s"])

    report = await run_fault(
        shop,
        "kill -9, restart empty",
        "Redis killed with `SIGKILL` and started again 1 s later on the same port, empty "
        "(no persistence): every record, count and cached entry is gone.",
        inject,
        seed=1,
        bound=RECOVERY,
    )
    check(report, reports)


async def test_script_flush(
    shop: ShopProcesses,
    redis_behind_proxy: tuple[RedisServer, ChaosProxy],
    reports: list[FaultReport],
) -> None:
    _, _, client = standalone(redis_behind_proxy)

    async def inject() -> Window:
        start = time.monotonic()
        for _ in range(3):
            await asyncio.to_thread(client.script_flush)
            await asyncio.sleep(0.3)
        return Window(start, time.monotonic())

    report = await run_fault(
        shop,
        "SCRIPT FLUSH",
        "`SCRIPT FLUSH` three times, 0.3 s apart: every loaded Lua script is forgotten "
        "(as after a restart or a failover to a fresh replica), the data stays.",
        inject,
        seed=2,
        bound=RECOVERY,
    )
    client.close()
    check(report, reports)


def pause(mode: str, seed: int) -> Callable[..., Awaitable[None]]:
    async def test(
        shop: ShopProcesses,
        redis_behind_proxy: tuple[RedisServer, ChaosProxy],
        reports: list[FaultReport],
    ) -> None:
        _, _, client = standalone(redis_behind_proxy)

        async def inject() -> Window:
            start = time.monotonic()
            await asyncio.to_thread(client.execute_command, "CLIENT", "PAUSE", 1500, mode)
            await asyncio.sleep(1.5)
            return Window(start + 0.0, start + 1.5)

        report = await run_fault(
            shop,
            f"CLIENT PAUSE {mode}",
            f"`CLIENT PAUSE 1500 {mode}`: for 1.5 s Redis holds "
            + (
                "every write (scripts included) while reads go on."
                if mode == "WRITE"
                else "every command."
            ),
            inject,
            seed=seed,
            bound=RECOVERY,
        )
        client.close()
        check(report, reports)

    return test


test_client_pause_write = pause("WRITE", 3)
test_client_pause_all = pause("ALL", 4)


async def test_proxy_latency(
    shop: ShopProcesses,
    redis_behind_proxy: tuple[RedisServer, ChaosProxy],
    reports: list[FaultReport],
) -> None:
    _, proxy, _ = standalone(redis_behind_proxy)

    async def inject() -> Window:
        start = time.monotonic()
        proxy.set_latency(0.15)
        await asyncio.sleep(2.0)
        proxy.set_latency(0.0)
        return Window(start, time.monotonic())

    report = await run_fault(
        shop,
        "proxy: latency",
        "The suite's TCP proxy between the shop and Redis delays every chunk by 150 ms "
        "each way for 2 s (300 ms a round trip, under the shop's 0.5 s Redis timeout).",
        inject,
        seed=5,
        bound=RECOVERY,
    )
    check(report, reports)


async def test_proxy_drops_connections(
    shop: ShopProcesses,
    redis_behind_proxy: tuple[RedisServer, ChaosProxy],
    reports: list[FaultReport],
) -> None:
    _, proxy, _ = standalone(redis_behind_proxy)

    async def inject() -> Window:
        start = time.monotonic()
        dropped = 0
        for _ in range(8):
            dropped += await asyncio.to_thread(proxy.drop)
            await asyncio.sleep(0.25)
        return Window(start, time.monotonic(), notes=[f"{dropped} connections reset"])

    report = await run_fault(
        shop,
        "proxy: dropped connections",
        "The suite's TCP proxy resets every open connection between the shop and Redis, "
        "every 0.25 s for 2 s.",
        inject,
        seed=6,
        bound=RECOVERY,
    )
    check(report, reports)


# --- the fault on a Redis Cluster ------------------------------------------------------


@pytest.mark.cluster
async def test_cluster_master_killed_replica_promoted(
    cluster_shop: ShopProcesses, cluster: RedisCluster, reports: list[FaultReport]
) -> None:
    client = redis.RedisCluster.from_url(cluster.url)

    async def inject() -> Window:
        victim = cluster.masters()[0]
        slots = cluster.slots_of(victim)
        start = time.monotonic()
        await asyncio.to_thread(victim.kill)
        promoted = await asyncio.to_thread(cluster.wait_until_ok, 30.0)
        return Window(
            start,
            time.monotonic(),
            lost_at=start,
            lost_slots=slots,
            notes=[
                f"killed the master of slots {slots}; its replica was promoted "
                f"{promoted:.2f} s later (detection and election; the fault's end)"
            ],
        )

    report = await run_fault(
        cluster_shop,
        "Cluster: master killed",
        "On a 6-node Redis Cluster (3 masters, 3 replicas, `cluster-node-timeout` "
        f"{NODE_TIMEOUT * 1000:.0f} ms) one master is killed with `SIGKILL`; its replica is "
        "promoted. The fault ends when the cluster serves every slot again.",
        inject,
        seed=7,
        bound=RECOVERY + NODE_TIMEOUT,
        records=client,
    )
    client.close()
    check(report, reports)
