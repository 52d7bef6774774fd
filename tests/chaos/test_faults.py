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
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from resilient.testing import RedisCluster, RedisServer
from tests.chaos.conftest import NODE_TIMEOUT
from tests.chaos.proxy import ChaosProxy
from tests.chaos.report import Admission, FaultReport
from tests.chaos.shop import (
    BLOCKS,
    LEASE,
    LOGIN_IP_LIMIT,
    WORKERS,
    Answer,
    Load,
    Readiness,
    ShopProcesses,
    cause_of_503,
    probe_latency,
    probe_recovery,
    watch_readiness,
)

pytestmark = [pytest.mark.chaos, pytest.mark.redis, pytest.mark.slow]

WARMUP = 1.0  # seconds of load before the fault
TAIL = 1.5  # seconds of load after the blocks recovered
ATTACK_SPAN = 2.5  # attackers start spread over this many seconds
RECOVERY = 1.0  # seconds allowed from a fault's end until every block serves normally
QUARANTINE = LEASE  # the shop refuses orders for one lease once it noticed a loss


def each_block(seconds: float) -> dict[str, float]:
    """The same recovery bound for every block the probe tries."""
    return dict.fromkeys(BLOCKS, seconds)


@dataclass
class Window:
    """When a fault happened (monotonic seconds), and what it cost Redis."""

    start: float
    end: float
    lost_at: float | None = None  # when Redis lost its data (None: it lost nothing)
    lost_slots: list[tuple[int, int]] | None = None  # only these slots (None: all)
    quarantine: float = 0.0  # seconds the shop refuses orders once it noticed the loss
    # The earliest moment the data's replacement could answer (the restarted server's
    # spawn): a claim may reach it, and stamp the loss, before `end` is measured.
    served_from: float | None = None
    ends: str = "the fault's end"  # what ends the fault, for the report
    notes: list[str] = field(default_factory=list)


Inject = Callable[[], Awaitable[Window]]
During = Callable[[Load, Window], Coroutine[Any, Any, None]]  # runs alongside the recovery's probe
Audit = Callable[[Load, Window, FaultReport], None]  # a fault's own checks, after the run


async def run_fault(
    shop: ShopProcesses,
    name: str,
    what: str,
    inject: Inject,
    *,
    seed: int,
    bounds: dict[str, float],
    records: redis.RedisCluster | None = None,
    during: During | None = None,
    audit: Audit | None = None,
) -> FaultReport:
    """Load the shop, inject the fault, probe the recovery, audit; return the figures.

    *bounds*: the recovery allowed to each block (``read``, ``login``, ``order``), in
    seconds from the fault's end. *during*, if given, runs alongside the probe; *audit*,
    if given, checks the fault's own promises once the run is over.
    """
    began = time.monotonic()
    offset = shop.stderr_size()
    load = Load(shop, prefix=f"{name.split(maxsplit=1)[0].lower().strip(':')}{seed}-", seed=seed)
    report = FaultReport(name=name, what=what, limit=LOGIN_IP_LIMIT, bounds=bounds)
    report.load = os.getloadavg()[0]  # the machine is shared: the load is part of the figures
    try:
        load.start(ATTACK_SPAN)
        await asyncio.sleep(WARMUP)
        # The probe's own latency under this load, so the recovery counts only the fault.
        baseline = await probe_latency(load)
        window = await inject()
        report.fault = (window.end - window.start, window.ends)
        report.quarantine = window.quarantine
        beside = None if during is None else asyncio.create_task(during(load, window))
        probe = await probe_recovery(load, window.end)
        if beside is not None:
            await beside
        report.recovery = {
            block: None if value is None else max(0.0, value - baseline[block])
            for block, value in ((block, getattr(probe, block)) for block in BLOCKS)
        }
        latency = ", ".join(f"{block} {baseline[block]:.2f} s" for block in BLOCKS)
        tries = ", ".join(f"{block} {probe.rounds.get(block, 0)}" for block in BLOCKS)
        report.notes.append(
            f"recovery: each block's first normal answer after the fault's end, less that "
            f"probe's own latency under the same load just before the fault ({latency}); "
            f"tries: {tries}"
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
    report.refusals = ledger.refusals()
    report.failures += [f"5xx or no answer: {u}" for u in ledger.unexpected(window.start)]
    report.failures += [f"traceback on stderr: {t}" for t in shop.tracebacks_since(offset)]
    audit_runs(shop, load, window, report)
    audit_admissions(load, window, report)
    if records is not None:
        report.failures += check_record_names(load, window, records)
    if audit is not None:
        audit(load, window, report)
    slow = {
        block: None if value is None else round(value, 2)
        for block, value in report.recovery.items()
        if value is None or value > bounds[block]
    }
    if slow:
        allowed = {block: bounds[block] for block in slow}
        report.failures.append(f"recovery over its bound: {slow}, allowed {allowed}")
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
    the key, so the client may run it again); two only where Redis lost the first run's
    record (the run was claimed before the loss, on a lost slot) and, after a loss the shop
    noticed, the second began after its quarantine. No run may begin in the quarantine."""
    runs = shop.runs(load.ledger.prefix)
    offset = time.time() - time.monotonic()  # monotonic to Unix time
    start = window.start + offset
    lost_at = None if window.lost_at is None else window.lost_at + offset
    # The quarantine runs one lease from the loss's stamp, made by the first claim the new
    # server answered: no earlier than its spawn, possibly before `end` was measured.
    stamped = window.end if window.served_from is None else window.served_from
    quarantined = (window.end + offset, stamped + window.quarantine + offset)
    if window.quarantine and lost_at is not None:
        # Each worker's quarantine starts at its first claim after the restart, so no
        # claim can begin a run from the restart until one quarantine after it.
        for key, found in runs.items():
            for run in found:
                if quarantined[0] <= run.began < quarantined[1]:
                    report.failures.append(
                        f"ran during the quarantine: {key} began "
                        f"{run.began - quarantined[0]:+.2f} s after the restart "
                        f"(status {run.status}, process {run.pid})"
                    )
        every = shop.runs("")  # the warm-up's orders too
        seen = {run.pid for found in every.values() for run in found if run.began < lost_at}
        report.notes.append(
            f"shop processes that had claimed a key before the loss (so could notice it): "
            f"{len(seen)} of {WORKERS}"
        )
    report.keys = len(load.ledger.orders)
    running: Counter[str] = Counter()  # what the clients of runs the loss cut got
    for key, entry in load.ledger.orders.items():
        stored = [run for run in runs.get(key, []) if run.status < 500]
        report.runs[len(stored)] += 1
        if len(stored) == 1:
            continue
        first, *others = stored
        if (
            len(others) == 1
            and lost_at is not None
            # Claimed on what was lost: a run's start is timed in the shop once its claim
            # is answered, which can be a few ms after the kill for a claim the old server
            # answered; no claim on a lost slot is answered until the data's replacement
            # (the restarted server, the promoted replica) serves, at the window's end.
            and first.began < window.end + offset
            and (not window.quarantine or others[0].began >= quarantined[1])
            and on_lost_slot(shop, load, key, window)
        ):
            # The record of a run that began before the loss went with Redis: completed
            # (its client answered) or still running (its complete found nothing).
            if first.ended < lost_at:
                report.lost.append(key)
            else:
                report.lost_running.append(key)
                running[describe(entry.answers[0])] += 1
            continue
        when = [
            f"{run.status} {run.began - start:+.2f}..{run.ended - start:+.2f} s"
            for run in runs.get(key, [])
        ]
        where = ""
        if window.lost_slots is not None:
            slot = record_slot(shop.users[entry.user], key)
            on = on_lost_slot(shop, load, key, window)
            where = f"; record in slot {slot}, {'on' if on else 'off'} the lost master"
        report.failures.append(
            f"handler runs per key not 1: {key} ran {len(stored)} times (runs {when} from "
            f"the fault's start{where}); answers {[describe(a) for a in entry.answers]}"
        )
    if running:
        report.notes.append(
            f"keys whose first run was cut by the loss: their first answer {dict(running)}"
        )


def on_lost_slot(shop: ShopProcesses, load: Load, key: str, window: Window) -> bool:
    """Whether *key*'s record was on what Redis lost (every slot, or the lost master's)."""
    if window.lost_slots is None:
        return True
    slot = record_slot(shop.users[load.ledger.orders[key].user], key)
    return any(first <= slot <= last for first, last in window.lost_slots)


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
    readiness: list[Readiness] = []
    resent: list[tuple[str, Answer]] = []

    async def inject() -> Window:
        start = time.monotonic()
        await asyncio.to_thread(server.kill)
        await asyncio.sleep(1.0)
        spawned = time.monotonic()
        await asyncio.to_thread(server.start)
        return Window(
            start,
            time.monotonic(),
            lost_at=start,
            served_from=spawned,
            quarantine=QUARANTINE,
            ends="killed until restarted",
            notes=["Redis down for 1 s"],
        )

    async def during(load: Load, window: Window) -> None:
        """Watch /readyz through the quarantine and past it; early in the quarantine, send
        again every key answered before the crash, whose record Redis lost."""
        watch = asyncio.create_task(
            watch_readiness(shop.url, window.end + window.quarantine + RECOVERY + 1.0)
        )
        await asyncio.sleep(0.3)
        done = [
            key
            for key, entry in list(load.ledger.orders.items())
            if any(a.status == 201 and a.answered < window.start for a in entry.answers)
        ]
        semaphore = asyncio.Semaphore(16)

        async def resend(key: str) -> None:
            async with semaphore:
                answer = await load.order(key, load.ledger.orders[key], kind="resend, quarantine")
                resent.append((key, answer))

        await asyncio.gather(*(resend(key) for key in done))
        readiness.extend(await watch)

    offset = shop.stderr_size()
    report = await run_fault(
        shop,
        "kill -9, restart empty",
        "Redis killed with `SIGKILL` and started again 1 s later on the same port, empty "
        "(no persistence): every record, count and cached entry is gone. The shop "
        f"quarantines orders for one lease ({QUARANTINE:g} s in the suite) from the first "
        "claim that notices.",
        inject,
        seed=1,
        bounds={"read": RECOVERY, "login": RECOVERY, "order": QUARANTINE + RECOVERY},
        during=during,
        audit=lambda load, window, report: audit_loss_noticed(
            load, window, report, log=shop.log_since(offset), readiness=readiness, resent=resent
        ),
    )
    check(report, reports)


def audit_loss_noticed(
    load: Load,
    window: Window,
    report: FaultReport,
    *,
    log: str,
    readiness: list[Readiness],
    resent: list[tuple[str, Answer]],
) -> None:
    """The loss was noticed and said: by every worker in the log (``BackendDataLost``),
    on ``/readyz`` (503, an idempotency check) during the quarantine and not after it;
    and each key resent in the quarantine was refused (503), not run."""
    events = log.count("BackendDataLost(")
    if events != WORKERS:
        report.failures.append(
            f"loss not noticed: {events} BackendDataLost events in the shop's log, "
            f"not one per worker ({WORKERS})"
        )
    restart = window.end
    quarantined = [r for r in readiness if r.status == 503 and r.idempotency]
    past = [r for r in readiness if r.at > restart + window.quarantine + RECOVERY]
    if not quarantined:
        report.failures.append("loss not noticed: /readyz never reported the quarantine")
    if not past or any(r.status != 200 or r.idempotency for r in past):
        report.failures.append(
            f"/readyz not ready after the quarantine: "
            f"{[(round(r.at - restart, 2), r.status, r.idempotency) for r in past][:5]}"
        )
    if quarantined:
        report.notes.append(
            f"/readyz: 503 with `{quarantined[0].idempotency}` from "
            f"{quarantined[0].at - restart:+.2f} s to {quarantined[-1].at - restart:+.2f} s "
            f"after the restart ({len(quarantined)} of {len(readiness)} answers), ready "
            f"again after it; {events} `BackendDataLost` events in the shop's log"
        )
    refused = [a for _, a in resent if a.status == 503]
    # A resend sent in the quarantine may reach a handler only after it (queued behind the
    # load on a busy machine): then it runs again, as a record Redis lost, and the runs'
    # audit checks that it began after the quarantine. One answered before the quarantine
    # could have ended (one lease from the restarted server's spawn) must be a refusal.
    ended = (window.end if window.served_from is None else window.served_from) + window.quarantine
    late = 0
    for key, answer in resent:
        if answer.status == 503:
            continue
        if answer.status is not None and answer.status < 500 and answer.answered >= ended:
            late += 1
            continue
        report.failures.append(
            f"resent in the quarantine, not refused: {key} answered {describe(answer)} "
            f"{answer.answered - restart:+.2f} s after the restart"
        )
    if late:
        report.notes.append(
            f"resends that reached the shop only after the quarantine, and ran: {late}"
        )
    causes = dict(Counter(cause_of_503(a) for a in refused))
    report.notes.append(
        f"every key answered before the crash, sent again 0.3 s after the restart: "
        f"{len(refused)} of {len(resent)} refused (503, by cause: {causes})"
    )
    orders = [
        a
        for answers in load.ledger.answers.values()
        for a in answers
        if a.status == 503 and cause_of_503(a) == "quarantine"
    ]
    if orders:
        first = min(a.answered for a in orders) - restart
        last = max(a.answered for a in orders) - restart
        report.notes.append(
            f"orders refused by the quarantine: {len(orders)}, answered from {first:+.2f} s "
            f"to {last:+.2f} s after the restart"
        )
        # Orders serve normally once no worker refuses them: each worker's quarantine
        # starts with its own first claim after the restart, so one that claims late
        # refuses late, whatever the probe (served by either worker) saw.
        served = report.recovery.get("order")
        if served is not None and last > served:
            report.recovery["order"] = last
            report.notes.append(
                f"orders: the probe's was served {served:.2f} s after the restart, but a "
                f"worker refused orders by its quarantine until {last:+.2f} s: the orders' "
                f"recovery is counted to that last refusal"
            )


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
        bounds=each_block(RECOVERY),
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
            bounds=each_block(RECOVERY),
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
        bounds=each_block(RECOVERY),
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
        bounds=each_block(RECOVERY),
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
            ends="killed until its replica promoted",
            notes=[
                f"killed the master of slots {slots}; its replica was promoted "
                f"{promoted:.2f} s later (Redis's own failover: the node timeout, then an "
                f"election); recovery is counted from the promotion"
            ],
        )

    report = await run_fault(
        cluster_shop,
        "Cluster: master killed",
        "On a 6-node Redis Cluster (3 masters, 3 replicas, `cluster-node-timeout` "
        f"{NODE_TIMEOUT * 1000:.0f} ms) one master is killed with `SIGKILL`; its replica is "
        "promoted. The fault ends when the cluster serves every slot again (the "
        "promotion); recovery is counted from there, allowed 1 s plus the node timeout.",
        inject,
        seed=7,
        bounds=each_block(RECOVERY + NODE_TIMEOUT),
        records=client,
    )
    client.close()
    check(report, reports)
