"""Circuit-breaker state shared through :class:`~resilient.RedisBackend`.

Each instance keeps counting its own calls, so the success path never talks to Redis.
Only transitions travel: an instance that opens a circuit publishes it (``publish.lua``)
and, every ``sync_interval`` seconds, each instance reads the shared state of its breakers
(``sync.lua``, one round trip per breaker). When an open period ends, the same script
elects one instance, holding a lease, as the only one allowed to probe; its probes close
the circuit for everyone, or open it again. If Redis is unreachable, each instance decides
on its own until Redis is back.

The publishing and reading run in one background task per backend, started on the event
loop of the first call through a shared breaker.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections import deque
from math import ceil
from typing import TYPE_CHECKING

from resilient._tasks import stop
from resilient.backends.redis import RedisBackend, Script
from resilient.breaker.core import State, Transition
from resilient.clock import SystemClock
from resilient.errors import BackendError
from resilient.events import BackendFailed, emit

if TYPE_CHECKING:
    from resilient.breaker.circuit import CircuitBreaker

__all__ = ["SharedBreakerStore"]

_PUBLISH = Script("resilient.breaker.lua", "publish.lua", needs_now=True)
_SYNC = Script("resilient.breaker.lua", "sync.lua", needs_now=True)
_KEEP_MS = 86_400_000  # a closed circuit's state is kept a day after its last change


class SharedBreakerStore:
    """The breakers of one :class:`RedisBackend` that share their state, and their sync task."""

    __slots__ = (
        "_backend",
        "_breakers",
        "_failing",
        "_lock",
        "_loop",
        "_pending",
        "_seen",
        "_task",
        "_wake",
        "interval",
        "token",
    )

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend
        self._breakers: dict[str, CircuitBreaker] = {}
        self._seen: dict[str, int] = {}
        self._pending: deque[tuple[CircuitBreaker, str]] = deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._failing = False
        self.interval = 1.0
        self.token = secrets.token_hex(8)  # this instance, as a prober

    def register(self, breaker: CircuitBreaker, interval: float) -> None:
        """Share *breaker*'s state; read it at least every *interval* seconds."""
        with self._lock:
            if self._breakers.setdefault(breaker.name, breaker) is not breaker:
                msg = f"another breaker named {breaker.name!r} already shares this backend"
                raise ValueError(msg)
            self.interval = min(self.interval, interval)
        breaker._core.gated = True

    def _key(self, name: str) -> str:
        return self._backend.key("cb", name, "s")

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
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run(), name="resilient breaker sync")

    def transitioned(self, breaker: CircuitBreaker, transition: Transition) -> None:
        """Queue a local transition for publishing (thread-safe); wake the sync task."""
        if transition.new is State.OPEN:
            kind = "open"
        elif transition.new is State.CLOSED and transition.old is State.HALF_OPEN:
            kind = "close"
        else:
            return  # manual states stay local
        self._pending.append((breaker, kind))
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)
        self.ensure_running()

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            await self.sync_now()
            try:
                async with asyncio.timeout(self.interval):
                    await wake.wait()
            except TimeoutError:
                pass
            wake.clear()

    async def sync_now(self) -> None:
        """Publish pending transitions, then read every shared breaker's state, now."""
        try:
            while self._pending:
                breaker, kind = self._pending.popleft()
                await self._publish(breaker, kind)
            for breaker in list(self._breakers.values()):
                await self._sync(breaker)
        except BackendError as exc:
            if not self._failing:
                emit(
                    next(iter(self._breakers.values())).observer if self._breakers else None,
                    BackendFailed("breaker", "sync", exc, "deciding locally"),
                )
            self._failing = True
            for breaker in self._breakers.values():
                breaker._core.gated = False  # no election without Redis: decide locally
            return
        if self._failing:
            self._failing = False
            for breaker in self._breakers.values():
                breaker._core.gated = True

    @staticmethod
    def _now(breaker: CircuitBreaker) -> str | int:
        """Redis's own clock, unless the breaker was given another (tests)."""
        clock = breaker.clock
        return "r" if isinstance(clock, SystemClock) else int(clock.time() * 1000)

    async def _publish(self, breaker: CircuitBreaker, kind: str) -> None:
        core = breaker._core
        open_for_ms = max(1, ceil(core.open_for * 1000))
        reply = await self._backend.run_script(
            _PUBLISH,
            [self._key(breaker.name)],
            (self._now(breaker), kind, open_for_ms, self.token, _KEEP_MS),
        )
        self._seen[breaker.name] = int(reply[0])

    async def _sync(self, breaker: CircuitBreaker) -> None:
        core = breaker._core
        lease_ms = max(1, ceil(max(core.open_for, self.interval * 3) * 1000))
        reply = await self._backend.run_script(
            _SYNC, [self._key(breaker.name)], (self._now(breaker), self.token, lease_ms)
        )
        kind, generation, ms = reply[0], int(reply[1]), int(reply[2])
        if isinstance(kind, bytes):
            kind = kind.decode()
        seen = self._seen.get(breaker.name, 0)
        self._seen[breaker.name] = max(seen, generation)
        now = breaker.clock.monotonic()
        transition = None
        with breaker._lock:
            state = core.state
            if kind == "c":
                if generation > seen and state in (State.OPEN, State.HALF_OPEN):
                    transition = core.force(State.CLOSED, "closed by another instance")
            elif kind in ("o", "w"):
                if state in (State.CLOSED, State.HALF_OPEN, State.OPEN):
                    wait = ms / 1000 if kind == "o" else min(ms / 1000, self.interval)
                    transition = core.open_at(now, wait, "opened by another instance")
            elif kind == "p" and state in (State.CLOSED, State.OPEN):
                transition = core.open_at(now, 0.0, "elected to probe")
                core.probe_granted = True
        if transition is not None:
            breaker._report(transition, publish=False)

    async def aclose(self) -> None:
        """Stop the sync task."""
        task, self._task = self._task, None
        await stop(task)

    def __repr__(self) -> str:
        return f"SharedBreakerStore({len(self._breakers)} breakers, interval={self.interval})"
