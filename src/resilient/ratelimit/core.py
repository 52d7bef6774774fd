"""Rate limiting decisions: pure functions of (policy, stored state, now, cost).

Nothing here does I/O. The memory backend runs it in process (:func:`evaluate`, and on
its hot path :meth:`Policy.step`, each policy's algorithm); the Redis backend runs the same
algorithms as ``lua/ratelimit.lua``, and the test suite checks that both agree with a
plain model on random traces.

Arithmetic is exact. Time is an integer number of milliseconds, counts are integers, and
every quantity stays an integer below 2**53, so Python's ``int`` and Lua's doubles compute
bit-for-bit the same values. Two algorithms:

* :class:`SlidingWindow`, the sliding-window counter: the count of the current fixed window
  plus the previous window's count weighted by how much of it still overlaps the sliding
  window. State ``(window index, current count, previous count, blocked until)``.
* :class:`TokenBucket`, an exact token bucket written as GCRA: the state is the bucket's
  *debt* (how far its theoretical arrival time runs ahead of now), scaled so that one
  millisecond of refill is ``limit`` units and one token is ``period_ms`` units. Fractions
  of a token refill exactly; nothing is floored away. State
  ``(updated at, debt, 0, blocked until)``.

``blocked until`` implements the optional block period: once a policy with ``block_for``
denies, it keeps denying until the period ends, whatever the counts say, and nothing can
be taken meanwhile (``remaining`` is 0). A block at least as long as the policy's window
outlives every unit counted before it, so the block forgets them: its ``retry_after`` is
the block, exactly, and the key starts afresh when it ends. (The sliding window would
otherwise still weigh its previous fixed window and answer a longer wait, up to twice its
period, depending on where the fixed windows of the clock in use happen to start.) A
shorter block keeps the counts: the window's own wait, if longer, still applies.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple, TypeAlias

from resilient.errors import ConfigurationError

__all__ = [
    "Algorithm",
    "Charge",
    "Decision",
    "Outcome",
    "Policy",
    "Rate",
    "SlidingWindow",
    "State",
    "TokenBucket",
    "Write",
    "charge",
    "combine",
    "decision_of",
    "evaluate",
    "validate_cost",
    "validate_policies",
]

# Integers must stay exactly representable as doubles inside Lua (2**53); keep headroom
# for the sums and products the algorithms form.
_MAX_PRODUCT: Final = 2**50

_UNITS: Final = {
    "ms": 0.001,
    "millisecond": 0.001,
    "milliseconds": 0.001,
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "days": 86400.0,
}
_RATE_RE: Final = re.compile(
    r"""^\s*(?P<limit>\d+)\s*(?:/|\s+per\s+)\s*(?P<count>\d+(?:\.\d+)?)?\s*(?P<unit>[a-z]+)\s*$""",
    re.IGNORECASE,
)
_UNIT_NAMES: Final = ((86400.0, "day"), (3600.0, "hour"), (60.0, "minute"), (1.0, "second"))


@dataclass(frozen=True, slots=True)
class Rate:
    """*limit* units per *period* seconds.

    >>> Rate.parse("100/minute")
    Rate(limit=100, period=60.0)
    >>> Rate.parse("5/15minutes").period
    900.0
    """

    limit: int
    period: float

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            msg = f"a rate's limit must be a positive integer, not {self.limit!r}"
            raise ConfigurationError(msg)
        if not _is_number(self.period):
            msg = f"a rate's period must be a number of seconds, not {self.period!r}"
            raise ConfigurationError(msg)
        period_ms = self.period * 1000
        if not math.isfinite(period_ms) or period_ms < 1 or period_ms != int(period_ms):
            msg = (
                f"a rate's period must be a whole number of milliseconds >= 1, not {self.period!r}s"
            )
            raise ConfigurationError(msg)
        object.__setattr__(self, "period", float(self.period))

    @classmethod
    def parse(cls, text: str | Rate) -> Rate:
        """Parse ``"100/minute"``, ``"10/second"``, ``"5/15minutes"``, ``"1000 per day"``.

        Units: ms, s/sec/second, m/min/minute, h/hour, d/day (plurals accepted).
        Raise :class:`~resilient.errors.ConfigurationError` (a ``ValueError``) on anything else.
        """
        if isinstance(text, Rate):
            return text
        if not isinstance(text, str):
            msg = f"a rate is a string like '100/minute', not {text!r}"
            raise ConfigurationError(msg)
        match = _RATE_RE.match(text)
        unit = _UNITS.get(match["unit"].lower()) if match else None
        if match is None or unit is None:
            msg = (
                f"cannot parse the rate {text!r}: expected '<limit>/<unit>' or "
                "'<limit>/<count><unit>', e.g. '100/minute' or '5/15minutes'"
            )
            raise ConfigurationError(msg)
        count = float(match["count"]) if match["count"] else 1.0
        return cls(int(match["limit"]), round(count * unit * 1000) / 1000)

    @property
    def period_ms(self) -> int:
        """The period in whole milliseconds."""
        return round(self.period * 1000)

    def __str__(self) -> str:
        for seconds, name in _UNIT_NAMES:
            if self.period == seconds:
                return f"{self.limit}/{name}"
            if self.period % seconds == 0:
                return f"{self.limit}/{self.period / seconds:g}{name}s"
        return f"{self.limit}/{self.period_ms}ms"


# Ten years: a block's end, a time in ms, stays far below 2**53 (exact in Lua's doubles).
_MAX_BLOCK_S: Final = 10 * 366 * 86_400


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _block_ms(block_for: float) -> int:
    if (
        not _is_number(block_for)
        or not math.isfinite(block_for)
        or not 0 <= block_for <= _MAX_BLOCK_S
    ):
        msg = f"block_for must be a number of seconds from 0 to ten years, not {block_for!r}"
        raise ConfigurationError(msg)
    return math.ceil(block_for * 1000)


class Algorithm(enum.IntEnum):
    """The algorithm a :class:`Policy` runs: its :attr:`~Policy.kind`.

    The values are the codes ``lua/ratelimit.lua`` reads in a policy's spec.
    """

    SLIDING_WINDOW = 1
    TOKEN_BUCKET = 2


State: TypeAlias = tuple[int, int, int, int]
"""A policy's stored state: four integers whose meaning depends on the algorithm."""

Charge: TypeAlias = tuple[bool, int, int, int, State, int]
"""What a policy's algorithm answers (:meth:`Policy.step`), flat:
``(allowed, remaining, reset_after_ms, retry_after_ms, state, ttl_ms)``.

The first four are the fields of its :class:`Outcome`; then come the state after charging
(nothing is charged when it denies) and how long that state matters, in milliseconds. A
plain tuple, for the hot path: a store that runs the algorithm in process answers an
admitted hit with it, and an adapter reads ``remaining`` (``[1]``) and
``reset_after_ms`` (``[2]``) from it, without an :class:`Outcome` or a :class:`Decision`.
"""


@dataclass(frozen=True, slots=True)
class Policy:
    """Base of the rate-limiting algorithms. Use :class:`SlidingWindow` or :class:`TokenBucket`."""

    rate: Rate
    block_for: float = 0.0
    name: str = ""
    # Derived at construction so the hot path reads plain attributes.
    kind: Algorithm = field(init=False, repr=False, compare=False)
    limit: int = field(init=False, repr=False, compare=False)
    capacity: int = field(init=False, repr=False, compare=False)
    period_ms: int = field(init=False, repr=False, compare=False)
    block_ms: int = field(init=False, repr=False, compare=False)
    id: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        msg = "Policy is abstract: use SlidingWindow(...) or TokenBucket(...)"
        raise TypeError(msg)

    @property
    def window(self) -> float:
        """Seconds for a full quota to come back from empty (RateLimit-Policy's ``w``)."""
        return self.capacity * self.period_ms / self.limit / 1000

    def step(self, state: State | None, now: int, cost: int) -> Charge:
        """Run this policy's algorithm once: what taking *cost* units at *now* gives.

        *now* is the time in integer milliseconds; *state* the stored state, ``None`` when
        there is none. Return the :data:`Charge`:
        the outcome if *cost* were taken, the state after taking it (or, when denied, after
        taking nothing) and how long that state matters. A pure function: the caller
        stores the state if it admits. :func:`charge` and :func:`evaluate` wrap it; only
        :func:`evaluate` applies the block period of a denial.
        """
        raise NotImplementedError


# Integer division below is written inline (``a // b`` floors, ``-(-a // b)`` rounds up):
# the algorithms run on every request. The Lua twin spells the same operations out.


class SlidingWindow(Policy):
    """A sliding-window counter: at most ``rate.limit`` units in any ``rate.period``.

    Two fixed windows weighted by overlap approximate the true sliding window in O(1)
    memory per key. ``block_for`` (seconds) keeps denying for that long after a denial.

    >>> SlidingWindow("5/minute", block_for=900).limit
    5
    """

    __slots__ = ()

    def __init__(self, rate: str | Rate, *, block_for: float = 0.0, name: str = "") -> None:
        parsed = Rate.parse(rate)
        _init_policy(
            self,
            Algorithm.SLIDING_WINDOW,
            parsed,
            capacity=parsed.limit,
            block_for=block_for,
            name=name or f"{parsed}",
        )

    def __repr__(self) -> str:
        extra = f", block_for={self.block_for!r}" if self.block_for else ""
        return f"SlidingWindow({str(self.rate)!r}{extra})"

    def step(  # noqa: PLR0912 (one branch per case of the algorithm)
        self, state: State | None, now: int, cost: int
    ) -> Charge:
        """Run the sliding window once; see :meth:`Policy.step`.

        State: ``(window index, current count, previous count, blocked until)``.
        """
        limit, window = self.limit, self.period_ms
        index = now // window
        if state is None:
            current = previous = blocked = 0
        else:
            stored, current, previous, blocked = state
            if index < stored:  # a clock behind the one that wrote the state
                index, now = stored, stored * window
            elif index == stored + 1:
                previous, current = current, 0
            elif index > stored + 1:
                previous = current = 0
        left = window - (now - index * window)  # of the current window; computed once
        weighted = previous * left + current * window
        full = limit * window
        fits = weighted + cost * window <= full
        allowed = fits and blocked <= now
        taken = cost if allowed else 0
        remaining = (full - weighted - taken * window) // window
        if remaining < 0:
            remaining = 0
        if current + taken > 0:
            reset = left + window
        elif previous > 0:
            reset = left
        else:
            reset = 0
        retry = 0
        if not fits:
            if current + cost <= limit:
                # Still in this window: wait for the previous window's weight to fall enough.
                need = previous * left - (limit - current - cost) * window
                retry = max(0, -(-need // previous))
            else:
                # In the next window the current count becomes the weighted previous one.
                later = -(-(current + cost - limit) * window // current) if current > 0 else 0
                retry = left + max(0, later)
        if blocked > now:
            retry = max(retry, blocked - now)
            reset = max(reset, blocked - now)
            remaining = 0
        return allowed, remaining, reset, retry, (index, current + taken, previous, blocked), reset


class TokenBucket(Policy):
    """A token bucket refilled at ``rate`` and holding at most ``burst`` tokens.

    ``burst`` defaults to the rate's limit. Refill is continuous and exact (GCRA), so
    fractions of a token are never lost to rounding.

    >>> TokenBucket(rate="10/second", burst=20).capacity
    20
    """

    __slots__ = ()

    def __init__(
        self,
        rate: str | Rate,
        *,
        burst: int | None = None,
        block_for: float = 0.0,
        name: str = "",
    ) -> None:
        parsed = Rate.parse(rate)
        capacity = parsed.limit if burst is None else burst
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            msg = f"burst must be a positive integer, not {burst!r}"
            raise ConfigurationError(msg)
        default_name = f"{parsed};burst={capacity}" if burst is not None else f"{parsed}"
        _init_policy(
            self,
            Algorithm.TOKEN_BUCKET,
            parsed,
            capacity=capacity,
            block_for=block_for,
            name=name or default_name,
        )

    def __repr__(self) -> str:
        extra = f", burst={self.capacity}" if self.capacity != self.rate.limit else ""
        if self.block_for:
            extra += f", block_for={self.block_for!r}"
        return f"TokenBucket({str(self.rate)!r}{extra})"

    def step(self, state: State | None, now: int, cost: int) -> Charge:
        """Run the token bucket once; see :meth:`Policy.step`.

        State: ``(updated at, debt, 0, blocked until)``.
        """
        rate, unit = self.limit, self.period_ms
        capacity = self.capacity * unit
        if state is None:
            debt = blocked = 0
        else:
            updated, debt, _, blocked = state
            if now < updated:  # a clock behind the one that wrote the state waits for it
                now = updated
            # Refill: elapsed * rate units, which pays off at most the whole debt. (The Lua
            # twin divides before it compares, so a long-idle key cannot overflow 2**53 in a
            # double; Python's integers cannot overflow, and the comparison means the same.)
            paid = (now - updated) * rate
            debt = 0 if paid >= debt else debt - paid
        wanted = debt + cost * unit
        if blocked <= now and wanted <= capacity:
            # Admitted, the common case, answered first: the debt becomes what was wanted,
            # nothing is blocked and there is no wait.
            reset = -(-wanted // rate)
            return True, (capacity - wanted) // unit, reset, 0, (now, wanted, 0, blocked), reset
        remaining = (capacity - debt) // unit
        if remaining < 0:
            remaining = 0
        reset = -(-debt // rate)
        retry = -(-(wanted - capacity) // rate)
        if blocked > now:
            retry = max(retry, blocked - now)
            reset = max(reset, blocked - now)
            remaining = 0
        elif retry < 0:
            retry = 0
        return False, remaining, reset, retry, (now, debt, 0, blocked), reset


_ID_PREFIXES: Final = {Algorithm.SLIDING_WINDOW: "sw", Algorithm.TOKEN_BUCKET: "tb"}


def _init_policy(
    policy: Policy, kind: Algorithm, rate: Rate, *, capacity: int, block_for: float, name: str
) -> None:
    block_ms = _block_ms(block_for)
    if capacity * rate.period_ms > _MAX_PRODUCT or rate.limit * rate.period_ms > _MAX_PRODUCT:
        msg = (
            f"the rate {rate} is too large to count exactly; "
            "use a shorter period or a smaller limit"
        )
        raise ConfigurationError(msg)
    if not isinstance(name, str) or not (name.isascii() and name.isprintable()):
        msg = f"a policy name must be a printable ASCII string, not {name!r}"
        raise ConfigurationError(msg)
    if '"' in name or "\\" in name:
        msg = f"a policy name must be printable and free of quotes and backslashes: {name!r}"
        raise ConfigurationError(msg)
    tail = f":b{block_ms}" if block_ms else ""
    values = {
        "rate": rate,
        "block_for": float(block_for),
        "name": name,
        "kind": kind,
        "limit": rate.limit,
        "capacity": capacity,
        "period_ms": rate.period_ms,
        "block_ms": block_ms,
        "id": f"{_ID_PREFIXES[kind]}:{capacity}:{rate.limit}:{rate.period_ms}{tail}",
    }
    for attribute, value in values.items():
        object.__setattr__(policy, attribute, value)


class Outcome(NamedTuple):
    """One policy's verdict; durations in milliseconds."""

    allowed: bool
    remaining: int
    reset_after_ms: int
    retry_after_ms: int


class Write(NamedTuple):
    """State to store for a policy, and for how long it matters (milliseconds, >= 1)."""

    state: State
    ttl_ms: int


# Named tuples built from a tuple skip their Python-level __new__: half the cost.
_new: Final = tuple.__new__


def charge(
    policy: Policy, state: State | None, now_ms: int, cost: int
) -> tuple[Outcome, State, int]:
    """Run one policy's algorithm: (outcome, state after charging *cost*, its TTL in ms).

    The fast path for a single policy: when the outcome allows, store the state for the
    TTL and the check is done. When it denies, call :func:`evaluate` instead, which also
    applies the block period. *cost* must be an integer from 0 to the policy's capacity
    and *now_ms* an integer (:class:`~resilient.errors.ConfigurationError` otherwise).
    """
    validate_cost(cost, (policy,))
    _validate_now(now_ms)
    allowed, remaining, reset, retry, new_state, ttl = policy.step(state, now_ms, cost)
    return _new(Outcome, (allowed, remaining, reset, retry)), new_state, ttl


def evaluate(
    policies: Sequence[Policy],
    states: Sequence[State | None],
    now_ms: int,
    cost: int,
    *,
    consume: bool = True,
) -> tuple[list[Outcome], list[Write | None]]:
    """Decide a check of *cost* units against every policy at once.

    The check is all-or-nothing: when any policy denies, none is charged (a denying policy
    with ``block_for`` records its block, nothing else). With ``consume=False`` nothing is
    charged either; the outcomes then say what a check of *cost* would get, with
    ``remaining`` counting the units left now.

    Return one :class:`Outcome` per policy and, per policy, the :class:`Write` to store
    (``None``: leave the stored state as it is). *cost* must be an integer from 0 to the
    smallest capacity and *now_ms* an integer (:class:`~resilient.errors.ConfigurationError`
    otherwise).
    """
    validate_cost(cost, policies)
    _validate_now(now_ms)
    results = [
        charge(policy, state, now_ms, cost) for policy, state in zip(policies, states, strict=True)
    ]
    admitted = all(outcome.allowed for outcome, _, _ in results)
    outcomes: list[Outcome] = []
    writes: list[Write | None] = []
    for policy, state, (result, new_state, ttl) in zip(policies, states, results, strict=True):
        if admitted and consume:
            outcomes.append(result)
            writes.append(Write(new_state, ttl) if cost > 0 else None)
            continue
        outcome = result
        if result.allowed:
            # Charged nothing after all: report what is left without this check.
            uncharged, _, _ = charge(policy, state, now_ms, 0)
            outcome = uncharged._replace(retry_after_ms=0)
            writes.append(None)
        elif consume and policy.block_ms and new_state[3] <= now_ms:
            block = policy.block_ms
            if policy.kind is Algorithm.SLIDING_WINDOW and block >= policy.period_ms:
                # The block outlives every unit counted: forget them, so that it lasts
                # exactly its length, wherever in its fixed window the count fell. (A
                # token bucket's debt is paid off within its window: nothing to forget.)
                blocked_state = (new_state[0], 0, 0, now_ms + block)
                outcome = _new(Outcome, (False, 0, block, block))
            else:
                blocked_state = (*new_state[:3], now_ms + block)
                retry = max(result.retry_after_ms, block)
                reset = max(result.reset_after_ms, block)
                outcome = _new(Outcome, (False, 0, reset, retry))
            writes.append(Write(blocked_state, outcome.reset_after_ms))
        else:
            writes.append(None)
        outcomes.append(outcome)
    return outcomes, writes


def validate_policies(policies: Sequence[Policy]) -> None:
    """Check that *policies* are distinct :class:`Policy` objects (at least one)."""
    if not policies:
        msg = "give at least one policy, e.g. SlidingWindow('100/minute')"
        raise ConfigurationError(msg)
    seen: set[str] = set()
    for policy in policies:
        if not isinstance(policy, Policy):
            msg = f"not a rate-limit policy: {policy!r}"
            raise ConfigurationError(msg)
        if policy.id in seen:
            msg = f"{policy!r} is given twice: each policy may be checked once per call"
            raise ConfigurationError(msg)
        seen.add(policy.id)


def validate_cost(cost: int, policies: Sequence[Policy]) -> None:
    """Check that *cost* is an integer from 0 to the smallest capacity of *policies*."""
    if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
        msg = f"cost must be an integer >= 0, not {cost!r}"
        raise ConfigurationError(msg)
    for policy in policies:
        if cost > policy.capacity:
            msg = f"cost {cost} exceeds the capacity of {policy!r}: it could never be admitted"
            raise ConfigurationError(msg)


def _validate_now(now_ms: int) -> None:
    if isinstance(now_ms, bool) or not isinstance(now_ms, int):
        msg = f"now_ms must be an integer number of milliseconds, not {now_ms!r}"
        raise ConfigurationError(msg)


class Decision(NamedTuple):
    """The answer to a rate-limit check.

    ``allowed`` says whether the call may go ahead. ``limit`` and ``remaining`` are those of
    the *binding* policy (``policy``): the one that denied with the longest wait, or, when
    everything allowed, the one with the fewest units left. ``reset_after`` is how many
    seconds until that policy's quota is full again; ``retry_after`` how many seconds to
    wait before the same check can pass (0 when allowed). ``details`` holds one decision
    per policy, in the order given, when the check had several (:attr:`per_policy` reads
    it either way). ``degraded`` is true when the backend failed and the limiter failed
    open.

    Decisions are immutable named tuples: cheap to make on every request.
    """

    allowed: bool
    limit: int
    remaining: int
    reset_after: float
    retry_after: float
    policy: Policy
    details: tuple[Decision, ...] = ()
    degraded: bool = False

    @property
    def per_policy(self) -> tuple[Decision, ...]:
        """One decision per policy checked, in the order given."""
        return self.details or (self,)


def decision_of(
    policy: Policy,
    allowed: bool,
    remaining: int,
    reset_after_ms: int,
    retry_after_ms: int,
    *,
    degraded: bool = False,
) -> Decision:
    """Return the :class:`Decision` of one policy's verdict, its durations in seconds.

    Every decision starts here: from an :class:`Outcome` (``decision_of(policy,
    *outcome)``), from the first four fields of a :data:`Charge`, or, *degraded*, for a
    check the backend could not answer. (A check of several policies folds theirs with
    :func:`combine`.)
    """
    return _new(
        Decision,
        (
            allowed,
            policy.capacity,
            remaining,
            reset_after_ms / 1000,
            retry_after_ms / 1000,
            policy,
            (),
            degraded,
        ),
    )


def combine(policies: Sequence[Policy], outcomes: Sequence[Outcome]) -> Decision:
    """Fold per-policy outcomes into one :class:`Decision` around the binding policy."""
    if len(policies) == 1:
        return decision_of(policies[0], *outcomes[0])
    details = tuple(decision_of(p, *o) for p, o in zip(policies, outcomes, strict=True))
    denied = [d for d in details if not d.allowed]
    if denied:
        binding = max(denied, key=lambda d: d.retry_after)
    else:
        binding = min(details, key=lambda d: (d.remaining, -d.reset_after))
    # The binding policy's decision allows exactly when every policy does.
    return binding._replace(details=details)
