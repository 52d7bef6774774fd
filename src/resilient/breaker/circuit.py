"""``CircuitBreaker``: stop calling a dependency that is failing, and probe its recovery."""

from __future__ import annotations

import contextvars
import functools
import inspect
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

from resilient.backends.redis import RedisBackend
from resilient.breaker.core import (
    FAILED,
    SLOW,
    BreakerCore,
    Shared,
    State,
    Transition,
    make_config,
)
from resilient.clock import Clock, SystemClock
from resilient.errors import CircuitOpenError, ConfigurationError
from resilient.events import (
    BreakerStateChanged,
    CallFailed,
    CallRejected,
    CallSucceeded,
    LoggingObserver,
    Observer,
    emit,
)

if TYPE_CHECKING:
    from resilient.breaker.redis import SharedBreakerStore

__all__ = ["BreakerRegistry", "CircuitBreaker"]

_P = ParamSpec("_P")
_R = TypeVar("_R")
_T = TypeVar("_T")
_DEFAULT_OBSERVER = LoggingObserver()
_CLOSED = State.CLOSED


class CircuitBreaker:
    """A circuit breaker with Resilience4j's semantics, for ``def`` and ``async def``.

    Use it as a decorator (``@breaker``), a context manager (``with breaker:`` or
    ``async with breaker:``) or through :meth:`call`. While *closed* it admits every call
    and keeps the outcomes of the last *window* calls (``window_type="count"``) or of the
    last *window* seconds (``"time"``). Once the window holds *minimum_calls*, a share of
    failures at or above *failure_rate*, or of calls slower than *slow_call_duration* at
    or above *slow_call_rate*, opens it: every call is rejected with
    :class:`~resilient.CircuitOpenError` (or answered by *fallback*, called with the
    call's arguments) for *open_for* seconds. Then it is *half-open*: exactly
    *half_open_calls* probes are admitted, and their outcomes close it or open it again,
    for *open_for* times *open_for_growth* per reopening, up to *max_open_for*.

    Exceptions that are instances of *record* count as failures, those of *ignore* (and
    cancellations) count as nothing, and any other exception counts as a success, as does
    a return value unless *failure_when* says otherwise (for example
    ``lambda r: r.status_code >= 500``).

    With *backend* (a :class:`~resilient.RedisBackend`), instances share transitions:
    one that opens the circuit opens it for all within *sync_interval* seconds, and once
    the open period is over, the probes go to one instance at a time, the first with a
    call, which claims the probe lease (see :mod:`resilient.breaker.redis`). Calls are
    still counted locally, so a successful call through a closed circuit costs no Redis
    command, and each instance goes on deciding alone while Redis is unreachable.

    No lock is held while the protected call runs; the success path of a closed breaker
    takes none at all once its count window is full of successes.

    >>> breaker = CircuitBreaker("payments", failure_rate=0.5, minimum_calls=10, window=20)
    >>> @breaker
    ... async def charge(cents: int) -> str: ...
    """

    __slots__ = (
        "_core",
        "_entered",
        "_failure_when",
        "_ignore",
        "_lock",
        "_quiet",
        "_record",
        "_shared",
        "_slow",
        "_timed",
        "clock",
        "fallback",
        "name",
        "observe_successes",
        "observer",
    )

    def __init__(
        self,
        name: str,
        *,
        failure_rate: float = 0.5,
        minimum_calls: int = 10,
        window: float = 100,
        window_type: Literal["count", "time"] = "count",
        slow_call_duration: float | None = None,
        slow_call_rate: float = 1.0,
        open_for: float = 30.0,
        open_for_growth: float = 1.0,
        max_open_for: float | None = None,
        half_open_calls: int = 1,
        record: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        ignore: type[BaseException] | tuple[type[BaseException], ...] = (),
        failure_when: Callable[[Any], bool] | None = None,
        fallback: Callable[..., Any] | None = None,
        backend: RedisBackend | None = None,
        sync_interval: float = 1.0,
        clock: Clock | None = None,
        observer: Observer | None = _DEFAULT_OBSERVER,
        observe_successes: bool = False,
    ) -> None:
        if not isinstance(name, str) or not name:
            msg = f"a circuit breaker needs a non-empty name, not {name!r}"
            raise ConfigurationError(msg)
        if slow_call_duration is not None and not slow_call_duration > 0:
            msg = f"slow_call_duration must be positive seconds or None, not {slow_call_duration!r}"
            raise ConfigurationError(msg)
        config = make_config(
            failure_rate=failure_rate,
            slow_call_rate=slow_call_rate,
            minimum_calls=minimum_calls,
            window=window,
            window_type=window_type,
            open_for=open_for,
            open_for_growth=open_for_growth,
            max_open_for=max_open_for,
            half_open_calls=half_open_calls,
        )
        self.name = name
        self._core = BreakerCore(config)
        self._lock = threading.Lock()
        self._record = record
        self._ignore = ignore
        self._failure_when = failure_when
        self._slow = slow_call_duration
        # Whether outcomes need the time: slow calls, or a time-based window.
        self._timed = slow_call_duration is not None or window_type == "time"
        # Whether a success needs neither the time nor a look at its result.
        self._quiet = not self._timed and failure_when is None
        self.fallback = fallback
        self.clock = clock or SystemClock()
        self.observer = observer
        self.observe_successes = observe_successes
        self._entered: contextvars.ContextVar[tuple[tuple[int, float], ...]] = (
            contextvars.ContextVar(f"breaker:{name}", default=())
        )
        self._shared: SharedBreakerStore | None = None
        if backend is not None:
            if not isinstance(backend, RedisBackend):
                msg = f"a shared breaker needs a RedisBackend, not {backend!r}"
                raise ConfigurationError(msg)
            if not sync_interval > 0:
                msg = f"sync_interval must be a positive number of seconds, not {sync_interval!r}"
                raise ConfigurationError(msg)
            from resilient.breaker.redis import SharedBreakerStore  # noqa: PLC0415

            self._shared = backend.store("breaker", SharedBreakerStore)
            try:
                self._shared.register(self, sync_interval)
            except ValueError as exc:
                raise ConfigurationError(str(exc)) from None
            self._core.shared = True
            self._shared.ensure_running()

    # --- state ------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The current state (an ``OPEN`` breaker whose time is up reads ``HALF_OPEN``)."""
        core = self._core
        if core.state is State.OPEN and self.clock.monotonic() >= core.open_until:
            return State.HALF_OPEN
        return core.state

    def metrics(self) -> dict[str, float]:
        """Return the window's calls, failures and slow calls, and the resulting rates."""
        with self._lock:
            calls, failures, slows = self._core.window.totals(self.clock.monotonic())
        return {
            "calls": calls,
            "failures": failures,
            "slow_calls": slows,
            "failure_rate": failures / calls if calls else 0.0,
            "slow_call_rate": slows / calls if calls else 0.0,
        }

    @property
    def shared_store(self) -> SharedBreakerStore | None:
        """The store this breaker shares its state through, or ``None`` (not shared)."""
        return self._shared

    def detach(self) -> None:
        """Stop sharing state through the backend: from now on this breaker decides alone.

        Its name can then be shared by a new breaker on the same backend, which takes up
        the shared state on its first sync. A :class:`BreakerRegistry` detaches each
        breaker it drops. Thread-safe; nothing happens if the breaker is not shared.
        """
        with self._lock:
            shared, self._shared = self._shared, None
            self._core.shared = False  # no probe lease to wait for: it probes alone
        if shared is not None:
            shared.unregister(self)

    @property
    def probing(self) -> bool:
        """Whether a probe admitted by this instance is in flight (it keeps its lease)."""
        return self._core.probing

    def wants_lease(self) -> bool:
        """Whether a call now would probe, but this instance does not hold the lease."""
        return self._core.wants_lease(self.clock.monotonic())

    def apply_shared(
        self,
        view: Shared,
        seconds: float,
        now: float,
        *,
        newer: bool = False,
        recheck: float = float("inf"),
    ) -> None:
        """Follow the shared state, read at monotonic *now*.

        See :meth:`BreakerCore.apply_shared`; a transition it causes is reported, not
        published again.
        """
        with self._lock:
            transition = self._core.apply_shared(view, seconds, now, newer=newer, recheck=recheck)
        self._report(transition, publish=False)

    def force_open(self) -> None:
        """Reject every call until :meth:`reset` or :meth:`force_closed`."""
        self._force(State.FORCED_OPEN, "forced open")

    def force_closed(self) -> None:
        """Close now, with an empty window (it may open again on new failures)."""
        self._force(State.CLOSED, "forced closed")

    def disable(self) -> None:
        """Admit every call and record nothing, until :meth:`reset`."""
        self._force(State.DISABLED, "disabled")

    def reset(self) -> None:
        """Back to closed, with an empty window and the initial ``open_for``."""
        with self._lock:
            transition = self._core.reset()
        self._report(transition)

    def _force(self, state: State, reason: str) -> None:
        with self._lock:
            transition = self._core.force(state, reason)
        self._report(transition)

    def _report(self, transition: Transition | None, *, publish: bool = True) -> None:
        if transition is not None:
            shared = self._shared  # once: another thread may detach the breaker
            if publish and shared is not None:
                shared.transitioned(self, transition, self._core.open_for)
            old, new, reason = transition
            emit(
                self.observer,
                BreakerStateChanged("breaker", self.name, old.value, new.value, reason),
            )

    # --- the logic of a call, once for every form -------------------------------------
    #
    # admit decides whether a call goes ahead, or says what it needs done before it can
    # decide (a shared circuit's probe lease claimed), and _admit_claimed decides once that
    # is done. returned and raised record how the call ended. The drivers below
    # (_run_sync and _run_async, behind call() and the decorator, and with, async with)
    # only carry that out: each claims the lease, calls and awaits the sync way or the
    # async way. The admission is not a generator, as auth/core.py's lookup is: making one
    # per call costs more than all the rest of a call through a closed circuit. For the
    # same reason a decorated function's wrapper reads admit's and returned's first test
    # itself, and leaves every other call to its driver.
    #
    # The same steps are public, for code that drives its calls itself (the httpx
    # transports' flow): admit, then admit_after_claim(_sync) if it answered None,
    # start_time, then returned or raised with the ticket admit gave.

    def admit(self) -> int | None:
        """Admit a call driven by hand: return its ticket, or ``None`` to claim a lease first.

        ``None`` means the call would probe a shared circuit whose probe lease this
        instance does not hold: claim it with :meth:`admit_after_claim` (async) or
        :meth:`admit_after_claim_sync`, which return the ticket. Raises
        :class:`~resilient.CircuitOpenError` if the circuit rejects the call (the caller
        decides whether :attr:`fallback` answers instead). Once admitted, take
        :meth:`start_time`, make the call, then hand the ticket to :meth:`returned` or
        :meth:`raised`, exactly once: that is all the decorator does.

        >>> breaker = CircuitBreaker("doc", observer=None)
        >>> ticket = breaker.admit()
        >>> started = breaker.start_time()
        >>> breaker.returned(ticket, started, "the result")
        'the result'
        """
        core = self._core
        generation = core.generation  # read first: a transition after it voids the call
        shared = self._shared
        if shared is not None and shared.idle:
            shared.ensure_running()
        if core.state is _CLOSED:
            return generation
        admitted, wants_lease = self._try_admit()
        if admitted is None and wants_lease:
            return None
        return self._admitted(admitted)

    def _admit_claimed(self, applied: bool) -> int:
        """:meth:`admit`, once the probe lease is claimed and the answer *applied* (or not)."""
        return self._admitted(self._try_admit()[0] if applied else None)

    def _admitted(self, generation: int | None) -> int:
        if generation is None:
            raise self._rejected()
        return generation

    def _try_admit(self) -> tuple[int | None, bool]:
        """Admit a call if the core does.

        Return its generation (or ``None``), and whether the call would probe but the
        probe lease must be claimed first.
        """
        core = self._core
        now = self.clock.monotonic()
        with self._lock:
            admitted, transition = core.admit(now)
            wants_lease = admitted is None and core.wants_lease(now)
        self._report(transition)
        return admitted, wants_lease

    def _rejected(self) -> CircuitOpenError:
        """Report a rejected call; return the error that tells its caller."""
        core = self._core
        with self._lock:
            retry_after = core.retry_after(self.clock.monotonic())
        emit(self.observer, CallRejected("breaker", self.name, retry_after))
        msg = f"circuit {self.name!r} is {core.state.value}; retry in {retry_after:.3f}s"
        return CircuitOpenError(msg, breaker=self.name, retry_after=retry_after)

    def start_time(self) -> float:
        """When an admitted call starts, if its outcome needs the time (else 0.0)."""
        return self.clock.monotonic() if self._timed else 0.0

    def returned(self, generation: int, start: float, result: _T) -> _T:
        """Record that the call admitted with ticket *generation* returned *result*.

        *start* is its :meth:`start_time`. It counts as a success, unless it was slow or
        *failure_when* says it failed. Returns *result*.
        """
        core = self._core
        if (
            self._quiet
            and generation == core.generation
            and core.window.clean
            and core.state is _CLOSED
            and not self.observe_successes
        ):
            # Most calls: nothing to time, judge or report, and a success in a window full
            # of successes changes nothing. No lock, no clock.
            return result
        flags = 0
        duration = None
        if self._timed:
            now = self.clock.monotonic()
            duration = now - start
            if self._slow is not None and duration > self._slow:
                flags = SLOW
        else:
            now = -1.0  # read below, only when the outcome must be recorded
        if self._failure_when is not None and self._failure_when(result):
            flags |= FAILED
        if flags:
            self._failed(generation, flags, now, None, duration)
            return result
        if core.state is not _CLOSED or not core.window.clean or generation != core.generation:
            if now < 0:
                now = self.clock.monotonic()
            with self._lock:
                transition = core.record(generation, 0, now)
            self._report(transition)
        if self.observe_successes:
            emit(self.observer, CallSucceeded("breaker", self.name, duration))
        return result

    def raised(self, generation: int, start: float, exc: BaseException) -> None:
        """Record that the call admitted with ticket *generation* raised *exc*.

        *start* is its :meth:`start_time`. An exception of *record* counts as a failure,
        one of *ignore* (or a cancellation) as nothing, any other as a success.
        """
        if not isinstance(exc, Exception) or isinstance(exc, self._ignore):
            with self._lock:
                self._core.release(generation)
            return
        if not isinstance(exc, self._record):
            self.returned(generation, start, None)
            return
        now = self.clock.monotonic()
        duration = now - start if self._timed else None
        flags = FAILED
        if self._slow is not None and duration is not None and duration > self._slow:
            flags |= SLOW
        self._failed(generation, flags, now, exc, duration)

    def _failed(
        self,
        generation: int,
        flags: int,
        now: float,
        exc: BaseException | None,
        duration: float | None,
    ) -> None:
        if not self._timed:
            now = self.clock.monotonic()  # opening needs the time
        with self._lock:
            transition = self._core.record(generation, flags, now)
        emit(self.observer, CallFailed("breaker", self.name, exc, bool(flags & SLOW), duration))
        self._report(transition)

    # --- the drivers: the sync way and the async way ----------------------------------

    def admit_after_claim_sync(self) -> int:
        """Claim the probe lease from this thread, then admit: :meth:`admit`'s ticket.

        From a worker thread this waits for the event loop's round trip; on the loop's own
        thread nothing may block, so the call is rejected and the sync task claims the
        lease for the next call (:meth:`SharedBreakerStore.claim_from_thread`).
        """
        shared = self._shared  # None: detached meanwhile, so it decides alone
        return self._admit_claimed(shared is None or shared.claim_from_thread(self))

    async def admit_after_claim(self) -> int:
        """Claim the probe lease now (one round trip), then admit: :meth:`admit`'s ticket.

        Raises :class:`~resilient.CircuitOpenError` if the circuit rejects the call.
        """
        shared = self._shared
        if shared is not None:
            await shared.claim(self)
        return self._admit_claimed(True)

    def _run_sync(self, function: Callable[..., _R], args: Any, kwargs: Any) -> _R:
        """Call ``function(*args, **kwargs)`` through the breaker: the sync driver."""
        try:
            generation = self.admit()
            if generation is None:
                generation = self.admit_after_claim_sync()
        except CircuitOpenError:
            if self.fallback is None:
                raise
            return self.fallback(*args, **kwargs)  # type: ignore[no-any-return]
        started = self.start_time()
        try:
            result = function(*args, **kwargs)
        except BaseException as exc:
            self.raised(generation, started, exc)
            raise
        return self.returned(generation, started, result)

    async def _run_async(
        self, function: Callable[..., Awaitable[_R]], args: Any, kwargs: Any
    ) -> _R:
        """Call and await ``function(*args, **kwargs)`` through the breaker: the async driver."""
        try:
            generation = self.admit()
            if generation is None:
                generation = await self.admit_after_claim()
        except CircuitOpenError:
            if self.fallback is None:
                raise
            answer = self.fallback(*args, **kwargs)
            return await answer if inspect.isawaitable(answer) else answer  # type: ignore[no-any-return]
        started = self.start_time()
        try:
            result = await function(*args, **kwargs)
        except BaseException as exc:
            self.raised(generation, started, exc)
            raise
        return self.returned(generation, started, result)

    def __call__(self, function: Callable[_P, _R]) -> Callable[_P, _R]:
        """Decorate *function* (``def`` or ``async def``) so its calls go through the breaker.

        The driver is chosen here, once: an ``async def`` gets the async one.
        """
        # The wrappers take the path of most calls themselves, with no call of ours: a
        # closed breaker with nothing to time or judge (see returned) and no shared store
        # to start (see admit), whose window stays full of successes. Any other call goes
        # through the driver. Each call of ours would cost more than all the rest.
        core = self._core
        quiet = self._quiet
        if inspect.iscoroutinefunction(function):
            run_async = self._run_async

            async def guarded_async(*args: Any, **kwargs: Any) -> Any:
                generation = core.generation
                if (
                    not quiet
                    or core.state is not _CLOSED
                    or ((shared := self._shared) is not None and shared.idle)
                ):
                    return await run_async(function, args, kwargs)
                try:
                    result = await function(*args, **kwargs)
                except BaseException as exc:
                    self.raised(generation, 0.0, exc)
                    raise
                if (
                    core.window.clean
                    and generation == core.generation
                    and not self.observe_successes
                ):
                    return result
                return self.returned(generation, 0.0, result)

            return functools.wraps(function)(guarded_async)  # type: ignore[return-value]

        run_sync = self._run_sync

        def guarded(*args: Any, **kwargs: Any) -> Any:
            generation = core.generation
            if (
                not quiet
                or core.state is not _CLOSED
                or ((shared := self._shared) is not None and shared.idle)
            ):
                return run_sync(function, args, kwargs)
            try:
                result = function(*args, **kwargs)
            except BaseException as exc:
                self.raised(generation, 0.0, exc)
                raise
            if core.window.clean and generation == core.generation and not self.observe_successes:
                return result
            return self.returned(generation, 0.0, result)

        return functools.wraps(function)(guarded)

    def call(self, function: Callable[..., _R], /, *args: Any, **kwargs: Any) -> _R:
        """Call *function* through the breaker; for an ``async def``, returns its awaitable."""
        if inspect.iscoroutinefunction(function):
            return self._run_async(function, args, kwargs)  # type: ignore[return-value]
        return self._run_sync(function, args, kwargs)

    def __enter__(self) -> CircuitBreaker:
        generation = self.admit()
        if generation is None:
            generation = self.admit_after_claim_sync()
        self._entered.set((*self._entered.get(), (generation, self.start_time())))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        entered = self._entered.get()
        (generation, start), rest = entered[-1], entered[:-1]
        self._entered.set(rest)
        if exc is None:
            self.returned(generation, start, None)
        else:
            self.raised(generation, start, exc)

    async def __aenter__(self) -> CircuitBreaker:
        generation = self.admit()
        if generation is None:
            generation = await self.admit_after_claim()
        self._entered.set((*self._entered.get(), (generation, self.start_time())))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, traceback)

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self.state.value!r})"


class BreakerRegistry:
    """One circuit breaker per key (a downstream host, say), made on first use.

    *factory* makes the breaker for a key. At most *max_size* breakers are kept: a new
    key in a full registry drops the least recently used closed breaker, or, when none is
    closed (every host it knows is failing), the least recently used of the others. Never
    more: a registry that kept every open breaker would grow without bound with the keys
    its callers make up (hosts taken from user input, say). A dropped breaker that was
    open costs at most a few calls to a failing host before its new breaker opens again.

    The registry owns the breakers its factory makes: a dropped one is detached
    (:meth:`CircuitBreaker.detach`), so a breaker sharing its state through a backend leaves
    it, and the same key asked for again gets a new breaker that takes up the shared state
    on its next sync. Use the breaker :meth:`get` returns for the call at hand; one kept
    longer may have been dropped and decide alone. :meth:`clear` drops them all.

    Making room costs O(1) amortised: breakers are kept in two queues, those last found
    closed and the others, each least recently used first; a closed breaker found open
    when room is made moves to the others once, paid for by the call that filed it.

    >>> breakers = BreakerRegistry(lambda host: CircuitBreaker(f"http:{host}"))
    >>> breakers.get("payments.internal").name
    'http:payments.internal'
    """

    __slots__ = ("_closed", "_factory", "_lock", "_others", "max_size")

    def __init__(self, factory: Callable[[str], CircuitBreaker], *, max_size: int = 1024) -> None:
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            msg = f"max_size must be a positive integer, not {max_size!r}"
            raise ConfigurationError(msg)
        self._factory = factory
        self.max_size = max_size
        # Least recently used first: breakers closed when last filed, and the others.
        self._closed: OrderedDict[str, CircuitBreaker] = OrderedDict()
        self._others: OrderedDict[str, CircuitBreaker] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> CircuitBreaker:
        """Return the breaker for *key*, making it with the factory the first time."""
        with self._lock:
            closed, others = self._closed, self._others
            breaker = closed.pop(key, None)
            if breaker is None:
                breaker = others.pop(key, None)
            if breaker is None:
                if len(closed) + len(others) >= self.max_size:
                    self._make_room()
                breaker = self._factory(key)
            # Filed at the end of its queue: the most recently used.
            (closed if breaker.state is _CLOSED else others)[key] = breaker
        return breaker

    def _make_room(self) -> None:
        """Drop one breaker: the least recently used closed one, else of the others."""
        closed, others = self._closed, self._others
        opened: list[tuple[str, CircuitBreaker]] = []  # since they were filed: kept
        while closed:
            key, breaker = closed.popitem(last=False)
            if breaker.state is _CLOSED:
                break
            opened.append((key, breaker))
        else:
            breaker = None
        # Unused since they were filed as closed: the least recently used of the others.
        for key, held in reversed(opened):
            others[key] = held
            others.move_to_end(key, last=False)
        if breaker is None:
            _, breaker = others.popitem(last=False)
        breaker.detach()

    def clear(self) -> None:
        """Drop every breaker, detaching each from its backend (see :meth:`get`)."""
        with self._lock:
            dropped = [*self._closed.values(), *self._others.values()]
            self._closed.clear()
            self._others.clear()
        for breaker in dropped:
            breaker.detach()

    def __len__(self) -> int:
        return len(self._closed) + len(self._others)

    def __iter__(self) -> Any:
        with self._lock:
            return iter([*self._closed.values(), *self._others.values()])

    def __repr__(self) -> str:
        return f"BreakerRegistry({len(self)} breakers)"
