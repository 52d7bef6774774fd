"""Circuit-breaker state shared through :class:`~resilient.RedisBackend`.

Each instance keeps counting its own calls, so the success path of a closed circuit never
talks to Redis. Only transitions travel: an instance that opens a circuit publishes it
(``publish.lua``) and, every ``sync_interval`` seconds, each instance reads the shared
state of its breakers (``sync.lua``, one round trip per breaker).

Once the open period is over, the probes go to one instance at a time, the one holding the
*probe lease*, and that is an instance with a call to probe with: the first call that
finds its circuit's open period over claims the lease (``claim.lua``, one round trip, on
the call path; a sync call on the event loop's own thread cannot wait for it, so the
background task claims it and the next call probes). The holder renews the lease on each
sync only while one of its probes is in flight; a lease lasts three sync intervals, so the
lease of an instance that died, or that received no more calls, runs out and the next
instance with a call probes. The holder's probes close the circuit for everyone, or open
it again. If Redis is
unreachable, each instance decides on its own until Redis is back.

The publishing and reading run in one background task per backend, started on the event
loop of the first call through a shared breaker.

A breaker leaves the store with :meth:`CircuitBreaker.detach` (a
:class:`~resilient.BreakerRegistry` detaches each breaker it drops), and its name can then be
shared by a new breaker, which takes up the shared state on its first sync. So the store
holds the live breakers only, and a sync's round trips are as many as they are. It is
explicit, not weak references: a dropped breaker may still be held by a call in flight, or
by a reference cycle the collector has not reached, and its name must be free for the next
breaker at once, whatever the garbage collector has done.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import threading
from concurrent.futures import CancelledError
from math import ceil
from typing import TYPE_CHECKING, Any, Final

from resilient._tasks import stop
from resilient.backends.redis import RedisBackend, Script
from resilient.breaker.core import Shared, State, Transition
from resilient.clock import SystemClock
from resilient.errors import BackendError
from resilient.events import BackendFailed, emit

if TYPE_CHECKING:
    from resilient.breaker.circuit import CircuitBreaker

__all__ = ["SharedBreakerStore"]

_PUBLISH = Script("resilient.breaker.lua", "publish.lua", needs_now=True)
_SYNC = Script("resilient.breaker.lua", "sync.lua", needs_now=True)
_CLAIM = Script("resilient.breaker.lua", "claim.lua", needs_now=True)
_KEEP_MS = 86_400_000  # a closed circuit's state is kept a day after its last change
_LEASE_INTERVALS = 3  # a lease lasts this many sync intervals of its holder

# The scripts' words, in one place (each script's header says what it takes and answers).
_REDIS_TIME: Final = "r"  # for "now": the script reads Redis TIME (backends/lua/now.lua)
_PUBLISH_OPEN: Final = "open"  # publish.lua: this instance opened the circuit
_PUBLISH_CLOSE: Final = "close"  # publish.lua: this instance's probes closed it
_RENEW, _NO_RENEW = "1", "0"  # sync.lua: whether to renew the lease (a probe is in flight)
_VIEWS: Final = {  # sync.lua and claim.lua: what the shared state says
    "c": Shared.CLOSED,
    "o": Shared.OPEN,
    "w": Shared.WAIT,
    "p": Shared.LEASED,
    "f": Shared.FREE,
}


class _Member:
    """A shared breaker, and the newest shared generation this instance has seen of it."""

    __slots__ = ("breaker", "seen")

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker
        self.seen = 0


class SharedBreakerStore:
    """The breakers of one :class:`RedisBackend` that share their state, and their sync task.

    ``len(store)`` is how many breakers share their state through it, and
    ``name in store`` whether a breaker of that name does.
    """

    __slots__ = (
        "_backend",
        "_breakers",
        "_claiming",
        "_failing",
        "_lock",
        "_loop",
        "_pending",
        "_syncing",
        "_task",
        "_wake",
        "_wanted",
        "interval",
        "token",
    )

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend
        self._breakers: dict[str, _Member] = {}
        # The latest transition of each breaker, to publish: one per breaker, so the queue
        # stays as small as the store however long Redis is unreachable ("open" always
        # wins and "close" counts only from the lease holder, so the latest is enough).
        self._pending: dict[str, tuple[_Member, str, float]] = {}  # kind: _PUBLISH_*
        self._wanted: dict[str, _Member] = {}  # leases asked for by sync calls
        # Claims on the wire, by breaker (not by name: a new breaker of a detached one's
        # name claims for itself).
        self._claiming: dict[CircuitBreaker, asyncio.Task[None]] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._syncing: asyncio.Lock | None = None
        self._wake: asyncio.Event | None = None
        self._failing = False
        self.interval = math.inf
        self.token = secrets.token_hex(8)  # this instance, as a prober

    def register(self, breaker: CircuitBreaker, interval: float) -> None:
        """Share *breaker*'s state; read it at least every *interval* seconds."""
        with self._lock:
            member = self._breakers.setdefault(breaker.name, _Member(breaker))
            if member.breaker is not breaker:
                msg = f"another breaker named {breaker.name!r} already shares this backend"
                raise ValueError(msg)
            self.interval = min(self.interval, interval)

    def unregister(self, breaker: CircuitBreaker) -> None:
        """Stop sharing *breaker*'s state (thread-safe); its name may be shared again.

        Its transitions not yet published, and a lease a sync call asked for, are dropped
        with it. Nothing happens if *breaker* is not registered.
        """
        name = breaker.name
        with self._lock:
            member = self._breakers.get(name)
            if member is None or member.breaker is not breaker:
                return
            del self._breakers[name]
            pending = self._pending.get(name)
            if pending is not None and pending[0] is member:
                del self._pending[name]
            if self._wanted.get(name) is member:
                del self._wanted[name]

    def _member(self, breaker: CircuitBreaker) -> _Member | None:
        member = self._breakers.get(breaker.name)
        return member if member is not None and member.breaker is breaker else None

    def __len__(self) -> int:
        return len(self._breakers)

    def __contains__(self, name: object) -> bool:
        return name in self._breakers

    def _key(self, name: str) -> str:
        return self._backend.key("cb", name, "s")

    @property
    def lease(self) -> float:
        """Seconds a probe lease lasts: three sync intervals, renewed while a probe runs."""
        return self.interval * _LEASE_INTERVALS

    @property
    def idle(self) -> bool:
        """Whether the sync task has not started (or has stopped)."""
        task = self._task
        return task is None or task.done()

    def ensure_running(self) -> None:
        """Start the sync task on the running event loop, if there is one and it is not."""
        if not self.idle:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop in this thread: the next call from async code starts it
        self._loop = loop
        self._wake = wake = asyncio.Event()
        self._task = loop.create_task(self._run(wake), name="resilient breaker sync")

    def _wake_up(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)
        self.ensure_running()

    def transitioned(
        self, breaker: CircuitBreaker, transition: Transition, open_for: float
    ) -> None:
        """Queue a local transition for publishing (thread-safe); wake the sync task.

        *open_for* is how long the circuit stays open, for an opening.
        """
        if transition.new is State.OPEN:
            kind = _PUBLISH_OPEN
        elif transition.new is State.CLOSED and transition.old is State.HALF_OPEN:
            kind = _PUBLISH_CLOSE
        else:
            return  # manual states stay local
        with self._lock:
            member = self._member(breaker)
            if member is None:
                return  # detached: it decides alone
            self._pending.pop(breaker.name, None)  # the latest goes last
            self._pending[breaker.name] = (member, kind, open_for)
        self._wake_up()

    def want_lease(self, breaker: CircuitBreaker) -> None:
        """Claim *breaker*'s probe lease in the background (thread-safe): a sync call wants it."""
        with self._lock:
            member = self._member(breaker)
            if member is None:
                return
            self._wanted[breaker.name] = member
        self._wake_up()

    def claim_from_thread(self, breaker: CircuitBreaker) -> bool:
        """Claim *breaker*'s lease for a sync call; return whether the answer is applied.

        From a thread other than the event loop's, the claim runs on the loop and this
        thread waits for it (one round trip, at most one sync interval). On the loop's own
        thread, or with no loop running, nothing may block: the sync task claims it for
        the next call, and this returns ``False``.
        """
        loop = self._loop
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            loop = None  # called on a running loop: blocking it would stall it
        if loop is None or loop.is_closed() or not loop.is_running():
            self.want_lease(breaker)
            return False
        future = asyncio.run_coroutine_threadsafe(self.claim(breaker), loop)
        try:
            future.result(timeout=self.interval)
        except (TimeoutError, CancelledError):  # the loop is busy, or shutting down
            future.cancel()
            return False
        return True

    async def claim(self, breaker: CircuitBreaker) -> None:
        """Claim *breaker*'s probe lease now, in one round trip, and apply the answer.

        Concurrent claims for one breaker share one round trip. If Redis is unreachable,
        every breaker of this store decides alone until a sync succeeds.
        """
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self.want_lease(breaker)  # another loop's calls: the sync task claims it
            return
        task = self._claiming.get(breaker)
        if task is None:
            task = loop.create_task(self._claim_or_fail(breaker))
            self._claiming[breaker] = task
            task.add_done_callback(lambda _: self._claiming.pop(breaker, None))
        await asyncio.shield(task)

    async def _claim_or_fail(self, breaker: CircuitBreaker) -> None:
        member = self._member(breaker)
        if member is None:
            return  # detached meanwhile: it decides alone
        try:
            await self._claim(member)
        except BackendError as exc:
            self._failed(exc, "claim")

    async def _run(self, wake: asyncio.Event) -> None:
        while True:
            await self.sync_now()
            try:
                async with asyncio.timeout(self.interval):
                    await wake.wait()
            except TimeoutError:
                pass
            wake.clear()

    async def sync_now(self) -> None:
        """Publish, claim the leases sync calls asked for, and read every state, now.

        Publishes the pending transitions first, then claims, then reads each shared
        breaker's state (renewing its lease while one of its probes is in flight).
        """
        if self._syncing is None:
            self._syncing = asyncio.Lock()
        async with self._syncing:  # one at a time: a sync by hand waits for the task's
            await self._sync_all()

    async def _sync_all(self) -> None:
        try:
            while self._pending:
                with self._lock:
                    name, entry = next(iter(self._pending.items()))
                await self._publish(*entry)
                with self._lock:  # published: dropped, unless a newer one replaced it
                    if self._pending.get(name) is entry:
                        del self._pending[name]
            while self._wanted:
                with self._lock:
                    _, member = self._wanted.popitem()
                if member.breaker.wants_lease():
                    await self._claim(member)
            for member in list(self._breakers.values()):  # the live breakers, one each
                await self._sync(member)
        except BackendError as exc:
            self._failed(exc, "sync")
            return
        self._failing = False

    def _failed(self, exc: BackendError, operation: str) -> None:
        members = list(self._breakers.values())
        if not self._failing:
            emit(
                members[0].breaker.observer if members else None,
                BackendFailed("breaker", operation, exc, "deciding locally"),
            )
        self._failing = True
        for member in members:
            breaker = member.breaker
            breaker.apply_shared(Shared.UNREACHABLE, 0.0, breaker.clock.monotonic())

    @staticmethod
    def _now(breaker: CircuitBreaker) -> str | int:
        """Redis's own clock, unless the breaker was given another (tests)."""
        clock = breaker.clock
        return _REDIS_TIME if isinstance(clock, SystemClock) else int(clock.time() * 1000)

    async def _publish(self, member: _Member, kind: str, open_for: float) -> None:
        breaker = member.breaker
        open_for_ms = max(1, ceil(open_for * 1000))
        reply = await self._backend.run_script(
            _PUBLISH,
            [self._key(breaker.name)],
            (self._now(breaker), kind, open_for_ms, self.token, _KEEP_MS),
        )
        member.seen = int(reply[0])

    def _lease_ms(self) -> int:
        return max(1, ceil(self.lease * 1000))

    async def _claim(self, member: _Member) -> None:
        breaker = member.breaker
        now = breaker.clock.monotonic()  # before the round trip: the lease ends no later here
        reply = await self._backend.run_script(
            _CLAIM,
            [self._key(breaker.name)],
            (self._now(breaker), self.token, self._lease_ms(), member.seen, _KEEP_MS),
        )
        self._apply(member, reply, now)

    async def _sync(self, member: _Member) -> None:
        breaker = member.breaker
        now = breaker.clock.monotonic()
        renew = _RENEW if breaker.probing else _NO_RENEW
        reply = await self._backend.run_script(
            _SYNC,
            [self._key(breaker.name)],
            (self._now(breaker), self.token, self._lease_ms(), renew),
        )
        self._apply(member, reply, now)

    def _apply(self, member: _Member, reply: Any, now: float) -> None:
        code, generation, ms = reply[0], int(reply[1]), int(reply[2])
        view = _VIEWS[code.decode() if isinstance(code, bytes) else str(code)]
        seen = member.seen
        member.seen = max(seen, generation)
        breaker = member.breaker
        if self._breakers.get(breaker.name) is not member:
            return  # detached during the round trip: it decides alone
        breaker.apply_shared(view, ms / 1000, now, newer=generation > seen, recheck=self.interval)

    async def aclose(self) -> None:
        """Stop the sync task."""
        task, self._task = self._task, None
        await stop(task)

    def __repr__(self) -> str:
        return f"SharedBreakerStore({len(self._breakers)} breakers, interval={self.interval})"
