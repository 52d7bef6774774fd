"""Who probes a shared circuit: an instance that has a call, one at a time, never for ever.

Each instance is a :class:`CircuitBreaker` on a :class:`RedisBackend` of its own (its own
client, its own token), on one real redis-server and one :class:`FakeClock`; the tests
drive each instance's ``sync_now()`` by hand, at the interval that instance was given.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio
from hypothesis import example, given
from hypothesis import strategies as st

from resilient import CircuitOpenError, RedisBackend
from resilient.breaker import CircuitBreaker, State
from resilient.breaker.redis import SharedBreakerStore
from resilient.events import BackendFailed, Event
from resilient.testing import FakeClock, RedisServer

Factory = Callable[[int], Awaitable[list[RedisBackend]]]


class Boom(Exception):
    pass


@pytest.fixture
async def backends(redis_server: RedisServer) -> AsyncIterator[Factory]:
    """Make *n* backends on the session's server, each with a client of its own: *n*
    instances of one service (the server is flushed first)."""
    if not redis_server.is_running:
        redis_server.start()
    made: list[tuple[redis.asyncio.Redis, RedisBackend]] = []

    async def make(n: int) -> list[RedisBackend]:
        for _ in range(n):
            client = redis.asyncio.Redis.from_url(redis_server.url)
            made.append((client, RedisBackend(client)))
        await made[0][0].flushall()
        return [backend for _, backend in made[-n:]]

    yield make
    for client, backend in made:
        await backend.aclose()
        await client.aclose()


def make(backend: RedisBackend, clock: FakeClock, **options: Any) -> CircuitBreaker:
    defaults: dict[str, Any] = {
        "failure_rate": 0.5,
        "minimum_calls": 2,
        "window": 2,
        "open_for": 10.0,
        "sync_interval": 60.0,  # the tests sync by hand; no background sync meanwhile
    }
    return CircuitBreaker("payments", backend=backend, clock=clock, **{**defaults, **options})


def store(breaker: CircuitBreaker) -> SharedBreakerStore:
    shared = breaker.shared_store
    assert shared is not None
    return shared


async def ok() -> str:
    return "ok"


def sync_ok() -> str:
    return "ok"


async def fail() -> None:
    raise Boom


async def trip(breaker: CircuitBreaker) -> None:
    for _ in range(2):
        with pytest.raises(Boom):
            await breaker.call(fail)
    assert breaker.state is State.OPEN


@pytest.fixture(params=["async", "worker thread"])
def way(request: pytest.FixtureRequest) -> str:
    """How calls are made: by the async driver, or by the sync driver from a worker thread
    (which waits for the event loop to claim the lease, as an async call does)."""
    return str(request.param)


async def admitted(breaker: CircuitBreaker, way: str = "async") -> bool:
    """Whether a call that succeeds gets through *breaker* now (made *way*)."""
    try:
        if way == "async":
            await breaker.call(ok)
        else:
            await asyncio.to_thread(breaker.call, sync_ok)
    except CircuitOpenError:
        return False
    return True


async def opened_then_over(clock: FakeClock, a: CircuitBreaker, b: CircuitBreaker) -> None:
    """*a* opens the circuit, *b* learns it, and the open period (10 s) ends for both."""
    await trip(a)
    await store(a).sync_now()
    await store(b).sync_now()
    clock.advance(10)


class Held:
    """A call kept in flight on *breaker* until :meth:`finish`."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.fails = False
        self.probe = False
        self.task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            breaker.call(self._run)
        )

    async def _run(self) -> None:
        self.probe = self.breaker.state is State.HALF_OPEN
        self.entered.set()
        await self.gate.wait()
        if self.fails:
            raise Boom

    async def started(self) -> bool:
        """Wait until the call is admitted (True) or rejected (False)."""
        entered = asyncio.ensure_future(self.entered.wait())
        await asyncio.wait({self.task, entered}, return_when=asyncio.FIRST_COMPLETED)
        entered.cancel()
        if self.entered.is_set():
            return True
        with pytest.raises(CircuitOpenError):
            self.task.result()
        return False

    async def finish(self, *, fails: bool = False) -> None:
        self.fails = fails
        self.gate.set()
        with contextlib.suppress(Boom):
            await self.task


async def test_traffic_only_on_instances_that_were_not_elected_gets_through(
    backends: Factory,
) -> None:
    # The shop: four workers, one of them synced first after the open period and
    # (before the fix) was elected to probe; that worker then got no traffic, and renewed
    # its lease on every sync while the others refused every order.
    clock = FakeClock()
    intervals = (1.0, 2.0, 3.0, 5.0)
    a, b, c, d = (
        make(backend, clock, sync_interval=interval)
        for backend, interval in zip(await backends(4), intervals, strict=True)
    )
    instances = (a, b, c, d)
    await trip(a)
    for instance in instances:
        await store(instance).sync_now()
    assert all(instance.state is State.OPEN for instance in instances)

    clock.advance(10)  # the open period is over; the provider is back
    await store(a).sync_now()  # a syncs first, and keeps syncing every second
    got_through_at = None
    for second in range(1, 121):
        clock.advance(1)
        for instance, interval in zip(instances, intervals, strict=True):
            if second % interval == 0:
                await store(instance).sync_now()
        traffic = (b, c, d)[second % 3]  # never a
        if await admitted(traffic):
            got_through_at = second
            break
    assert got_through_at == 1  # at once: the call itself claims the probe's lease


async def test_the_first_call_after_the_open_period_probes_without_waiting_for_a_sync(
    backends: Factory, way: str
) -> None:
    clock = FakeClock()
    a, b = (make(backend, clock) for backend in await backends(2))
    await opened_then_over(clock, a, b)
    assert await admitted(b, way)  # b probed (one round trip) and closed
    assert b.state is State.CLOSED
    await store(b).sync_now()  # publishes the close
    await store(a).sync_now()
    assert a.state is State.CLOSED


async def test_a_block_claims_the_lease_as_a_call_does(backends: Factory, way: str) -> None:
    clock = FakeClock()
    a, b = (make(backend, clock) for backend in await backends(2))
    await opened_then_over(clock, a, b)
    if way == "async":
        async with b:  # claims the lease (one round trip), then probes
            pass
    else:

        def block() -> None:
            with b:  # waits for the event loop to claim the lease, then probes
                pass

        await asyncio.to_thread(block)
    assert b.state is State.CLOSED
    await store(b).sync_now()  # publishes the close
    await store(a).sync_now()
    assert a.state is State.CLOSED


async def test_an_idle_prober_does_not_keep_its_lease(backends: Factory, way: str) -> None:
    clock = FakeClock()
    a, b = (
        make(backend, clock, half_open_calls=2, sync_interval=1.0) for backend in await backends(2)
    )
    await opened_then_over(clock, a, b)
    assert await admitted(a, way)  # a holds the lease: 1 probe of 2 done, then no more traffic
    assert not await admitted(b, way)  # b waits while a's lease runs
    for _ in range(3):  # a syncs every second, with no call in flight: no renewal
        clock.advance(1)
        await store(a).sync_now()
    clock.advance(0.001)
    assert await admitted(b, way)  # a's lease ran out: b, which has the traffic, probes
    assert await admitted(b, way)  # 2 of 2: closed
    assert b.state is State.CLOSED


async def test_a_prober_with_a_call_in_flight_keeps_its_lease(backends: Factory) -> None:
    clock = FakeClock()
    a, b = (make(backend, clock, sync_interval=1.0) for backend in await backends(2))
    await opened_then_over(clock, a, b)
    probe = Held(a)
    assert await probe.started()
    assert probe.probe
    for _ in range(10):  # a slow probe: a renews its lease while it runs
        clock.advance(1)
        await store(a).sync_now()
        await store(b).sync_now()
        assert not await admitted(b)
    await probe.finish()
    assert a.state is State.CLOSED
    await store(a).sync_now()
    await store(b).sync_now()
    assert b.state is State.CLOSED


async def test_the_lease_of_a_prober_that_died_runs_out(backends: Factory) -> None:
    clock = FakeClock()
    a, b = (make(backend, clock, sync_interval=1.0) for backend in await backends(2))
    await opened_then_over(clock, a, b)
    probe = Held(a)
    assert await probe.started()  # a probes, then dies: it never syncs again
    clock.advance(1)
    await store(b).sync_now()
    assert not await admitted(b)
    clock.advance(2)  # the lease is three sync intervals of the prober
    await store(b).sync_now()
    assert await admitted(b)
    assert b.state is State.CLOSED
    probe.task.cancel()


async def test_without_redis_a_call_after_the_open_period_probes_locally(
    fresh_redis_server: RedisServer, way: str
) -> None:
    clock, events = FakeClock(), list[Event]()
    client = redis.asyncio.Redis.from_url(fresh_redis_server.url, socket_timeout=1)
    async with RedisBackend(client) as backend:
        a = make(backend, clock, observer=events.append)
        await trip(a)
        await store(a).sync_now()
        fresh_redis_server.stop()
        clock.advance(10)
        assert await admitted(a, way)  # the claim fails: a decides alone, and probes
        assert a.state is State.CLOSED
    await client.aclose()
    failures = [e for e in events if isinstance(e, BackendFailed)]
    assert [e.outcome for e in failures] == ["deciding locally"]  # once, by sync or claim


async def test_a_circuit_redis_forgot_is_claimed_once(
    backends: Factory, redis_server: RedisServer, way: str
) -> None:
    # Redis restarted empty (here: flushed) while both instances were open: the first
    # call after the open period restores the shared state and probes; the other waits.
    clock = FakeClock()
    a, b = (make(backend, clock, half_open_calls=2) for backend in await backends(2))
    await trip(a)
    await store(a).sync_now()
    await store(b).sync_now()
    flusher = redis.asyncio.Redis.from_url(redis_server.url)
    await flusher.flushall()
    await flusher.aclose()
    clock.advance(10)
    assert await admitted(a, way)
    assert not await admitted(b, way)


# --- random traces ------------------------------------------------------------------------

INSTANCES = 3
INSTANCE = st.integers(0, INSTANCES - 1)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("tick"), st.sampled_from([5.0, 45.0, 90.0, 200.0])),
        st.tuples(st.sampled_from(["begin", "begin", "begin", "trip", "kill"]), INSTANCE),
        st.tuples(st.sampled_from(["end", "call"]), INSTANCE, st.booleans()),
    ),
    max_size=30,
)


class Trace:
    """Instances on one server and one clock, each syncing on its own schedule."""

    def __init__(
        self,
        breakers: list[CircuitBreaker],
        clock: FakeClock,
        half_open_calls: int,
        open_for: float,
    ) -> None:
        self.breakers = breakers
        self.clock = clock
        self.half_open_calls = half_open_calls
        self.open_for = open_for
        self.intervals = [store(b).interval for b in breakers]
        self.next_sync = list(self.intervals)
        self.held: list[list[Held]] = [[] for _ in breakers]
        self.alive = [True] * len(breakers)

    async def tick(self, seconds: float) -> None:
        """Move time on; every live instance syncs whenever its interval comes round."""
        end = self.clock.monotonic() + seconds
        while True:
            due, i = min((t, i) for i, t in enumerate(self.next_sync) if self.alive[i])
            if due > end:
                break
            self.clock.advance(max(0.0, due - self.clock.monotonic()))
            await store(self.breakers[i]).sync_now()
            self.next_sync[i] += self.intervals[i]
        self.clock.advance(end - self.clock.monotonic())

    def check(self) -> None:
        """At most half_open_calls probes in flight across live instances, on one of them."""
        probing = [
            sum(1 for h in self.held[i] if h.probe and not h.task.done())
            for i in range(len(self.breakers))
            if self.alive[i]
        ]
        assert sum(probing) <= self.half_open_calls
        assert sum(1 for n in probing if n) <= 1

    async def step(self, kind: str, i: int, fails: bool) -> None:
        breaker = self.breakers[i]
        if kind in ("trip", "call"):
            for _ in range(2 if kind == "trip" else 1):
                with contextlib.suppress(Boom, CircuitOpenError):
                    await breaker.call(fail if kind == "trip" or fails else ok)
        elif kind == "begin":
            call = Held(breaker)
            if await call.started():
                self.held[i].append(call)
        elif kind == "end" and self.held[i]:
            await self.held[i].pop(0).finish(fails=fails)
        elif kind == "kill" and sum(self.alive) > 1:
            self.alive[i] = False  # it stops syncing; its calls hang for ever

    async def recover(self, first: int) -> None:
        """The dependency is back: any live instance's call gets through, then all do."""
        for i, calls in enumerate(self.held):
            if self.alive[i]:
                for call in calls:
                    await call.finish()
                    self.check()
        await self.tick(max(self.intervals) * 3 + self.open_for + 1)
        n = len(self.breakers)
        first = next(i % n for i in range(first, first + n) if self.alive[i % n])
        for _ in range(self.half_open_calls):  # at once: the call claims the lease
            assert await admitted(self.breakers[first]), f"instance {first} refuses calls"
        await store(self.breakers[first]).sync_now()  # its close is published
        await self.tick(max(self.intervals))  # and reaches every instance within its interval
        for i, breaker in enumerate(self.breakers):
            if self.alive[i]:
                assert await admitted(breaker), f"instance {i} still refuses calls"

    async def aclose(self) -> None:
        for calls in self.held:
            for call in calls:
                call.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Boom):
                    await call.task


@example(  # a probe in flight for longer than a lease: its instance keeps renewing it
    ops=[("tick", 45.0), ("begin", 0), ("tick", 200.0), ("tick", 200.0), ("begin", 1)],
    intervals=[60.0, 60.0, 60.0],
    half_open_calls=1,
    open_for=30.0,
    first=0,
)
@example(  # a probe in flight on instance 1; instance 2's call must not probe too
    ops=[("tick", 45.0), ("begin", 1), ("begin", 2)],
    intervals=[60.0, 60.0, 60.0],
    half_open_calls=2,
    open_for=30.0,
    first=0,
)
@example(  # opened by instance 0; after the open period the traffic is only on instance 1
    ops=[("tick", 45.0)],
    intervals=[60.0, 60.0, 60.0],
    half_open_calls=1,
    open_for=30.0,
    first=1,
)
@given(
    ops=OPS,
    intervals=st.lists(st.sampled_from([60.0, 120.0, 180.0]), min_size=3, max_size=3),
    half_open_calls=st.integers(1, 3),
    open_for=st.sampled_from([30.0, 100.0]),
    first=st.integers(0, INSTANCES - 1),
)
async def test_random_traces_keep_one_prober_and_recover(
    redis_server: RedisServer,
    ops: list[tuple[Any, ...]],
    intervals: list[float],
    half_open_calls: int,
    *,
    open_for: float,
    first: int,
) -> None:
    # On live instances that sync on schedule: at most half_open_calls probes in flight
    # across instances, all on one. At the end, with the dependency healthy and every
    # lease run out, a call on any live instance gets through at once.
    if not redis_server.is_running:
        redis_server.start()
    clock = FakeClock()
    clients = [redis.asyncio.Redis.from_url(redis_server.url) for _ in range(INSTANCES)]
    await clients[0].flushall()
    async with contextlib.AsyncExitStack() as stack:
        breakers = [
            make(
                await stack.enter_async_context(RedisBackend(client)),
                clock,
                sync_interval=interval,
                failure_rate=1.0,  # so a success never opens it
                open_for=open_for,
                half_open_calls=half_open_calls,
            )
            for client, interval in zip(clients, intervals, strict=True)
        ]
        trace = Trace(breakers, clock, half_open_calls, open_for)
        await trace.step("trip", 0, True)  # every trace starts with the circuit open
        for breaker in breakers:
            await store(breaker).sync_now()
        for kind, *args in ops:
            if kind == "tick":
                await trace.tick(args[0])
            elif trace.alive[args[0]]:
                await trace.step(kind, args[0], bool(args[1:] and args[1]))
            trace.check()
        await trace.recover(first)
        await trace.aclose()
    for client in clients:
        await client.aclose()


async def evalsha_calls(client: Any) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_concurrent_calls_share_one_claim_and_rejections_cost_no_round_trip(
    backends: Factory,
) -> None:
    clock = FakeClock()
    made = await backends(2)
    a, b = (make(backend, clock, half_open_calls=3) for backend in made)
    client = made[0].client
    await opened_then_over(clock, a, b)
    before = await evalsha_calls(client)
    calls = [Held(b) for _ in range(50)]  # 50 calls reach b at once
    started = [await call.started() for call in calls]
    assert sum(started) == 3  # exactly half_open_calls probes
    # One claim for all of them (plus, at most, a read by a background task meanwhile).
    assert await evalsha_calls(client) - before <= 2
    before = await evalsha_calls(client)
    assert not await admitted(a)  # a asks once, and is told to wait its sync interval
    for _ in range(100):
        assert not await admitted(a)  # ... without asking again
    assert await evalsha_calls(client) - before <= 2
    for call in calls:
        if not call.task.done():
            await call.finish()
    assert b.state is State.CLOSED


async def test_a_sync_call_has_the_lease_claimed_for_the_next_call(backends: Factory) -> None:
    clock = FakeClock()
    a, b = (make(backend, clock) for backend in await backends(2))
    await opened_then_over(clock, a, b)

    @b
    def charge() -> str:
        return "charged"

    with pytest.raises(CircuitOpenError) as raised:
        charge()  # a sync form cannot wait for Redis: rejected, the lease is asked for
    assert raised.value.retry_after == 0
    await store(b).sync_now()  # the background task's turn: it claims the lease
    assert charge() == "charged"  # the probe
    assert b.state is State.CLOSED


async def test_a_sync_call_from_a_worker_thread_claims_the_lease_at_once(
    backends: Factory,
) -> None:
    clock = FakeClock()
    a, b = (make(backend, clock) for backend in await backends(2))
    await opened_then_over(clock, a, b)

    @b
    def charge() -> str:
        return "charged"

    assert await asyncio.to_thread(charge) == "charged"  # the thread waits for the claim
    assert b.state is State.CLOSED
