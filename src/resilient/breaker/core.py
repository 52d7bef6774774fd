"""The circuit breaker's state machine, without clocks, locks or I/O.

::

    CLOSED ──failure or slow-call rate ≥ threshold──▶ OPEN ──open_for elapsed──▶ HALF_OPEN
      ▲        (over the window, once minimum_calls)     ▲                          │
      │                                                  └───── probes fail ────────┤
      └──────────────────────── probes succeed ────────────────────────────────────┘

* In ``CLOSED`` every call is admitted and its outcome recorded in a window: the last
  *N* calls (count-based), or the calls of the last *N* seconds, kept in buckets
  (time-based). After each outcome, once the window holds ``minimum_calls``, a failure
  rate or slow-call rate at or above its threshold opens the circuit (as in
  Resilience4j, the outcome that tips it may be a success that fills the window).
* ``OPEN`` rejects every call for ``open_for`` seconds, then the next call moves the
  circuit to ``HALF_OPEN``. Each reopening without a close in between multiplies
  ``open_for`` by ``open_for_growth``, up to ``max_open_for``.
* ``HALF_OPEN`` admits exactly ``half_open_calls`` probes and rejects the rest; when every
  probe has finished, their failure and slow-call rates decide: back to ``OPEN``, or
  ``CLOSED`` with an empty window.
* ``FORCED_OPEN`` rejects and ``DISABLED`` admits everything, recording nothing, until
  :meth:`BreakerCore.reset`.

Shared between instances (:mod:`resilient.breaker.redis`), an open circuit whose time is
up half-opens only on the instance that holds the *probe lease*, and only while it holds
it: the instance claims the lease when a call arrives (:meth:`BreakerCore.wants_lease`),
and the store tells the core what the shared state says (:meth:`BreakerCore.apply_shared`).

Every transition starts a new *generation*. An admission returns the generation it was
made in, and an outcome counts only in that generation, so a call that started before the
circuit opened cannot count against the probes that follow.
"""

from __future__ import annotations

import enum
import math
from fractions import Fraction
from typing import NamedTuple

from resilient.errors import ConfigurationError

__all__ = [
    "FAILED",
    "SLOW",
    "BreakerConfig",
    "BreakerCore",
    "CountWindow",
    "Shared",
    "State",
    "TimeWindow",
]

FAILED = 1
"""Outcome flag: the call failed (``flags & FAILED`` counts it: 1 or 0)."""
SLOW = 2
"""Outcome flag: the call was slower than ``slow_call_duration``."""
_SLOW_SHIFT = 1  # (flags & SLOW) >> _SLOW_SHIFT counts a slow call: 1 or 0


class State(enum.Enum):
    """The states of a circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"


class Shared(enum.Enum):
    """What the shared state says of a circuit, as one instance reads it.

    The store's scripts answer in short codes, which :mod:`resilient.breaker.redis` maps
    to these.
    """

    CLOSED = "closed"
    """Closed for every instance."""
    OPEN = "open"
    """Open for every instance, for the seconds given."""
    WAIT = "wait"
    """Another instance holds the probe lease, for the seconds given."""
    LEASED = "leased"
    """This instance holds the probe lease, for the seconds given."""
    FREE = "free"
    """The open period is over and nobody holds the lease: the next call may claim it."""
    UNREACHABLE = "unreachable"
    """The shared state cannot be read: the instance decides alone."""


class BreakerConfig(NamedTuple):
    """A breaker's thresholds and timings, validated by :func:`make_config`."""

    failure_rate: float
    slow_call_rate: float
    minimum_calls: int
    window: float
    window_type: str
    open_for: float
    open_for_growth: float
    max_open_for: float
    half_open_calls: int


def make_config(
    *,
    failure_rate: float,
    slow_call_rate: float,
    minimum_calls: int,
    window: float,
    window_type: str,
    open_for: float,
    open_for_growth: float,
    max_open_for: float | None,
    half_open_calls: int,
) -> BreakerConfig:
    """Return a :class:`BreakerConfig`, or raise :class:`ConfigurationError` naming the culprit."""
    for name, rate in (("failure_rate", failure_rate), ("slow_call_rate", slow_call_rate)):
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 1:
            msg = f"{name} must be a fraction in (0, 1], not {rate!r}"
            raise ConfigurationError(msg)
    for name, count in (("minimum_calls", minimum_calls), ("half_open_calls", half_open_calls)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            msg = f"{name} must be a positive integer, not {count!r}"
            raise ConfigurationError(msg)
    if window_type not in ("count", "time"):
        msg = f"window_type must be 'count' or 'time', not {window_type!r}"
        raise ConfigurationError(msg)
    if window_type == "count" and (
        isinstance(window, bool) or not isinstance(window, int) or window < 1
    ):
        msg = f"a count-based window is a positive number of calls, not {window!r}"
        raise ConfigurationError(msg)
    if isinstance(window, bool) or not isinstance(window, int | float) or not window > 0:
        msg = f"window must be positive, not {window!r}"
        raise ConfigurationError(msg)
    if not math.isfinite(window):
        msg = f"window must be finite, not {window!r}"
        raise ConfigurationError(msg)
    if not isinstance(open_for, int | float) or not open_for > 0 or not math.isfinite(open_for):
        msg = f"open_for must be a positive number of seconds, not {open_for!r}"
        raise ConfigurationError(msg)
    if not isinstance(open_for_growth, int | float) or not 1 <= open_for_growth < math.inf:
        msg = f"open_for_growth must be a number >= 1, not {open_for_growth!r}"
        raise ConfigurationError(msg)
    cap = open_for if max_open_for is None else max_open_for
    if not isinstance(cap, int | float) or cap < open_for or not math.isfinite(cap):
        msg = f"max_open_for must be a number of seconds >= open_for, not {max_open_for!r}"
        raise ConfigurationError(msg)
    if window_type == "count" and minimum_calls > window:
        msg = (
            f"minimum_calls ({minimum_calls}) exceeds the window of {window} calls: "
            "the circuit could never open"
        )
        raise ConfigurationError(msg)
    return BreakerConfig(
        float(failure_rate),
        float(slow_call_rate),
        minimum_calls,
        window,
        window_type,
        float(open_for),
        float(open_for_growth),
        float(cap),
        half_open_calls,
    )


def _fraction(rate: float) -> Fraction:
    return Fraction(str(rate))


def _reaches(count: int, calls: int, rate: Fraction) -> bool:
    """Whether count / calls >= rate, exactly."""
    return count * rate.denominator >= rate.numerator * calls


class CountWindow:
    """The outcomes of the last *size* calls: a ring of flags and running totals."""

    __slots__ = ("calls", "clean", "failures", "pos", "ring", "size", "slows")

    def __init__(self, size: int) -> None:
        self.size = size
        self.ring = bytearray(size)
        self.pos = 0
        self.calls = self.failures = self.slows = 0
        # Whether a success would change nothing: the window is full of successes. Kept
        # as a plain attribute, read without a lock on the success path.
        self.clean = False

    def record(self, flags: int, now: float) -> None:
        """Add one outcome, evicting the oldest once the window is full."""
        pos = self.pos
        if self.calls == self.size:
            old = self.ring[pos]
            self.failures -= old & FAILED
            self.slows -= (old & SLOW) >> _SLOW_SHIFT
        else:
            self.calls += 1
        self.ring[pos] = flags
        self.failures += flags & FAILED
        self.slows += (flags & SLOW) >> _SLOW_SHIFT
        self.pos = pos + 1 if pos + 1 < self.size else 0
        self.clean = self.calls == self.size and not self.failures and not self.slows

    def totals(self, now: float) -> tuple[int, int, int]:
        """Return (calls, failures, slow calls) in the window."""
        return self.calls, self.failures, self.slows


class TimeWindow:
    """The outcomes of the last *seconds*, in buckets of *width* seconds.

    A call at time *t* falls in bucket ``floor(t / width)``; the window at *now* holds the
    ``n = ceil(seconds / width)`` buckets up to and including ``floor(now / width)``.
    """

    __slots__ = ("buckets", "calls", "clean", "current", "failures", "n", "slows", "width")

    def __init__(self, seconds: float, width: float | None = None) -> None:
        self.width = width if width is not None else max(1.0, seconds / 60)
        self.n = max(1, math.ceil(seconds / self.width))
        self.buckets = [[0, 0, 0] for _ in range(self.n)]  # calls, failures, slows
        self.current = -1  # the epoch of the newest bucket
        self.clean = False  # every call changes the rates' denominator of a time window
        self.calls = self.failures = self.slows = 0

    def _roll(self, now: float) -> int:
        epoch = math.floor(now / self.width)
        if epoch > self.current:
            stale = min(epoch - self.current, self.n)
            for e in range(epoch - stale + 1, epoch + 1):
                bucket = self.buckets[e % self.n]
                self.calls -= bucket[0]
                self.failures -= bucket[1]
                self.slows -= bucket[2]
                bucket[0] = bucket[1] = bucket[2] = 0
            self.current = epoch
        return epoch

    def record(self, flags: int, now: float) -> None:
        """Add one outcome at *now* (never earlier than the newest bucket)."""
        epoch = self._roll(now)
        bucket = self.buckets[max(epoch, self.current) % self.n]
        failed, slow = flags & FAILED, (flags & SLOW) >> _SLOW_SHIFT
        bucket[0] += 1
        bucket[1] += failed
        bucket[2] += slow
        self.calls += 1
        self.failures += failed
        self.slows += slow

    def totals(self, now: float) -> tuple[int, int, int]:
        """Return (calls, failures, slow calls) in the window at *now*."""
        self._roll(now)
        return self.calls, self.failures, self.slows


class Transition(NamedTuple):
    """A change of state, for events: from, to, and why."""

    old: State
    new: State
    reason: str


class BreakerCore:
    """The state machine of one circuit breaker; the caller serialises access to it.

    *now* arguments are monotonic seconds. :meth:`admit` and :meth:`record` return the
    transition they caused (or ``None``) for the caller to report.
    """

    __slots__ = (
        "_failure_rate",
        "_slow_rate",
        "config",
        "generation",
        "lease_until",
        "open_for",
        "open_until",
        "probe_calls",
        "probe_failures",
        "probe_slows",
        "probes_out",
        "shared",
        "state",
        "trips",
        "window",
    )

    def __init__(self, config: BreakerConfig) -> None:
        self.config = config
        # Rates as the decimals they print as, compared in integers: 3 failures in 30
        # calls reach 0.1 exactly, which 0.1 * 30 in floating point does not.
        self._failure_rate = _fraction(config.failure_rate)
        self._slow_rate = _fraction(config.slow_call_rate)
        self.state = State.CLOSED
        self.generation = 0
        self.window: CountWindow | TimeWindow = self._new_window()
        self.open_until = 0.0
        self.open_for = config.open_for
        self.trips = 0  # reopenings since the last close
        # Shared state: while *shared*, an open circuit whose time is up half-opens, and
        # a half-open one admits probes, only until *lease_until* (this instance holds
        # the probe lease until then).
        self.shared = False
        self.lease_until = -math.inf
        self.probes_out = self.probe_calls = self.probe_failures = self.probe_slows = 0

    def _new_window(self) -> CountWindow | TimeWindow:
        config = self.config
        if config.window_type == "count":
            return CountWindow(int(config.window))
        return TimeWindow(config.window)

    def retry_after(self, now: float) -> float:
        """Seconds until a rejected call could be admitted (0 when half-open).

        Waited from *now*, they reach the end of the open period: ``now + retry_after``
        is not below it, although ``now + (open_until - now)`` may round below it.
        """
        if self.state is State.OPEN:
            until = self.open_until
            wait = until - now
            if wait <= 0:
                return 0.0
            while now + wait < until:  # once or twice at most: an ulp of *until* each
                wait += math.ulp(until)
            return wait
        if self.state is State.FORCED_OPEN:
            return math.inf
        return 0.0

    def admit(self, now: float) -> tuple[int | None, Transition | None]:
        """Admit a call: return its generation, or ``None`` when it is rejected."""
        state = self.state
        if state is State.CLOSED or state is State.DISABLED:
            return self.generation, None
        transition = None
        if state is State.OPEN:
            if now < self.open_until or (self.shared and now >= self.lease_until):
                return None, None
            transition = self._move(State.HALF_OPEN, "open_for elapsed")
        elif state is State.FORCED_OPEN or (self.shared and now >= self.lease_until):
            return None, None  # forced open, or half-open without the probe lease
        if self.probes_out >= self.config.half_open_calls:
            return None, transition
        self.probes_out += 1
        return self.generation, transition

    def wants_lease(self, now: float) -> bool:
        """Whether a call now would probe, but this instance does not hold the lease."""
        state = self.state
        return (
            self.shared
            and now >= self.lease_until
            and (state is State.HALF_OPEN or (state is State.OPEN and now >= self.open_until))
        )

    @property
    def probing(self) -> bool:
        """Whether a probe admitted by this instance is in flight."""
        return self.state is State.HALF_OPEN and self.probes_out > self.probe_calls

    def apply_shared(
        self,
        view: Shared,
        seconds: float,
        now: float,
        *,
        newer: bool = False,
        recheck: float = math.inf,
    ) -> Transition | None:
        """Follow what the shared state says (read at *now*); return the transition.

        *seconds* go with *view* (how long the circuit stays open, or the lease runs);
        *newer* says whether the shared state changed since this instance last read it;
        while another instance probes, this one reads the state again after *recheck*
        seconds at most.
        """
        if view is Shared.UNREACHABLE:
            self.shared = False  # no lease without the shared state: decide alone
            return None
        self.shared = True
        state = self.state
        if state is State.FORCED_OPEN or state is State.DISABLED:
            return None  # manual states stay local
        transition = None
        if view is Shared.CLOSED:
            if newer and (state is State.OPEN or state is State.HALF_OPEN):
                transition = self._close("closed by another instance")
        elif view is Shared.LEASED or view is Shared.FREE:
            self.lease_until = now + seconds if view is Shared.LEASED else -math.inf
            if state is State.OPEN:
                self.open_until = min(self.open_until, now)
            elif state is State.CLOSED and view is Shared.FREE:
                transition = self.open_at(now, 0.0, "opened by another instance")
        else:  # OPEN, or WAIT: another instance probes, read again within *recheck*
            wait = min(seconds, recheck) if view is Shared.WAIT else seconds
            transition = self.open_at(now, wait, "opened by another instance")
        return transition

    def release(self, generation: int) -> None:
        """Give back a probe admitted in *generation* that recorded no outcome."""
        if generation == self.generation and self.state is State.HALF_OPEN:
            self.probes_out -= 1

    def record(self, generation: int, flags: int, now: float) -> Transition | None:
        """Record the outcome of a call admitted in *generation*."""
        if generation != self.generation:
            return None  # admitted before the last transition: no longer relevant
        if self.state is State.CLOSED:
            return self._record_closed(flags, now)
        if self.state is State.HALF_OPEN:
            return self._record_probe(flags, now)
        return None

    def _record_closed(self, flags: int, now: float) -> Transition | None:
        window = self.window
        window.record(flags, now)
        if window.clean:
            return None
        config = self.config
        calls, failures, slows = window.totals(now)
        if calls < config.minimum_calls:
            return None
        if _reaches(failures, calls, self._failure_rate):
            return self._open(now, f"failure rate {failures}/{calls}")
        if _reaches(slows, calls, self._slow_rate):
            return self._open(now, f"slow-call rate {slows}/{calls}")
        return None

    def _record_probe(self, flags: int, now: float) -> Transition | None:
        config = self.config
        self.probe_calls += 1
        self.probe_failures += flags & FAILED
        self.probe_slows += (flags & SLOW) >> _SLOW_SHIFT
        calls = self.probe_calls
        if calls < config.half_open_calls:
            return None
        if _reaches(self.probe_failures, calls, self._failure_rate):
            return self._open(now, f"probes failed ({self.probe_failures}/{calls})")
        if _reaches(self.probe_slows, calls, self._slow_rate):
            return self._open(now, f"probes slow ({self.probe_slows}/{calls})")
        return self._close("probes succeeded")

    def _open(self, now: float, reason: str) -> Transition:
        if self.state is State.HALF_OPEN:
            self.trips += 1
            self.open_for = min(
                self.config.open_for * self.config.open_for_growth**self.trips,
                self.config.max_open_for,
            )
        self.open_until = now + self.open_for
        self.lease_until = -math.inf
        return self._move(State.OPEN, reason)

    def _close(self, reason: str) -> Transition:
        self.trips = 0
        self.open_for = self.config.open_for
        self.window = self._new_window()
        self.lease_until = -math.inf
        return self._move(State.CLOSED, reason)

    def _move(self, state: State, reason: str) -> Transition:
        old, self.state = self.state, state
        self.generation += 1
        self.probes_out = self.probe_calls = self.probe_failures = self.probe_slows = 0
        return Transition(old, state, reason)

    def open_at(self, now: float, open_for: float, reason: str) -> Transition | None:
        """Open now for *open_for* seconds (a transition learnt from another instance)."""
        if self.state in (State.FORCED_OPEN, State.DISABLED):
            return None
        self.open_until = now + open_for
        self.lease_until = -math.inf
        if self.state is State.OPEN:
            return None
        return self._move(State.OPEN, reason)

    def force(self, state: State, reason: str) -> Transition | None:
        """Move to *state* by hand: CLOSED (empty window), FORCED_OPEN or DISABLED."""
        if state is State.CLOSED:
            if self.state is State.CLOSED:
                self.window = self._new_window()
                return None
            return self._close(reason)
        if self.state is state:
            return None
        return self._move(state, reason)

    def reset(self) -> Transition | None:
        """Back to CLOSED with an empty window and the initial ``open_for``."""
        transition = self._close("reset") if self.state is not State.CLOSED else None
        self.trips = 0
        self.open_for = self.config.open_for
        self.window = self._new_window()
        return transition
