"""A plain model of the rate-limiting algorithms, written for clarity, not speed.

The sliding window keeps every window's count forever; the token bucket keeps its tokens
as an exact fraction. Durations are found by searching time for the first millisecond at
which a predicate holds, not by formula. The production code (Python core and Lua) must
agree with this model exactly.

The block period: a denial by a policy with ``block_for`` denies everything for that long,
and nothing can be taken meanwhile (``remaining`` is 0). A block at least as long as the
policy's window outlives every unit counted before it, so they are forgotten: when the
block ends the key starts afresh, and the block's ``retry_after`` is the block, exactly,
whatever the phase of the window (the sliding window's two fixed windows would otherwise
still weigh units the block outlived).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from resilient.ratelimit.core import Algorithm, Outcome, Policy


def first_ms(predicate: Callable[[int], bool], limit: int) -> int:
    """Return the smallest t in [0, limit] with predicate(t), predicate being monotone."""
    low, high = 0, limit
    assert predicate(high), "the search bound is too small"
    while low < high:
        middle = (low + high) // 2
        if predicate(middle):
            high = middle
        else:
            low = middle + 1
    return low


@dataclass
class WindowModel:
    limit: int
    window: int
    block: int
    counts: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    blocked_until: int = 0

    def weighted(self, now: int) -> int:
        """The sliding count at *now*, scaled by the window length."""
        index, elapsed = divmod(now, self.window)
        return self.counts[index - 1] * (self.window - elapsed) + self.counts[index] * self.window

    def fits(self, now: int, cost: int) -> bool:
        return self.weighted(now) + cost * self.window <= self.limit * self.window

    def allows(self, now: int, cost: int) -> bool:
        return now >= self.blocked_until and self.fits(now, cost)

    def outlived_by(self, block: int) -> bool:
        """Whether a block of *block* ms outlives every unit counted before it."""
        return block >= self.window

    def forget(self) -> None:
        self.counts.clear()

    def outcome(self, now: int, cost: int, taken: int) -> Outcome:
        horizon = 2 * self.window + self.block + 1
        allowed = self.allows(now, cost)
        remaining = (
            self.limit * self.window - self.weighted(now) - taken * self.window
        ) // self.window
        if now < self.blocked_until:
            remaining = 0
        if taken:
            self.counts[now // self.window] += taken
        reset = first_ms(
            lambda t: self.weighted(now + t) == 0 and now + t >= self.blocked_until, horizon
        )
        if taken:
            self.counts[now // self.window] -= taken
        retry = 0 if allowed else first_ms(lambda t: self.allows(now + t, cost), horizon)
        return Outcome(allowed, max(0, remaining), reset, retry)

    def charge(self, now: int, cost: int) -> None:
        self.counts[now // self.window] += cost


@dataclass
class BucketModel:
    rate: int
    period: int
    burst: int
    block: int
    tokens: Fraction = Fraction(-1)
    updated: int = 0
    blocked_until: int = 0

    def level(self, now: int) -> Fraction:
        if self.tokens < 0:
            return Fraction(self.burst)
        refill = Fraction((now - self.updated) * self.rate, self.period)
        return min(Fraction(self.burst), self.tokens + refill)

    def allows(self, now: int, cost: int) -> bool:
        return now >= self.blocked_until and self.level(now) >= cost

    def outlived_by(self, block: int) -> bool:
        """Whether a block of *block* ms outlives every unit counted before it."""
        return block * self.rate >= self.burst * self.period  # the time to refill from empty

    def forget(self) -> None:
        self.tokens = Fraction(-1)

    def outcome(self, now: int, cost: int, taken: int) -> Outcome:
        horizon = (self.burst + cost) * self.period + self.block + 1
        allowed = self.allows(now, cost)
        level = self.level(now) - taken
        remaining = 0 if now < self.blocked_until else int(level // 1)
        full_at = first_ms(
            lambda t: level + Fraction(t * self.rate, self.period) >= self.burst, horizon
        )
        reset = max(full_at, self.blocked_until - now)
        retry = 0 if allowed else first_ms(lambda t: self.allows(now + t, cost), horizon)
        return Outcome(allowed, max(0, remaining), reset, retry)

    def charge(self, now: int, cost: int) -> None:
        self.tokens = self.level(now) - cost
        self.updated = now


Model = WindowModel | BucketModel


def model_of(policy: Policy) -> Model:
    if policy.kind is Algorithm.SLIDING_WINDOW:
        return WindowModel(policy.limit, policy.period_ms, policy.block_ms)
    return BucketModel(policy.limit, policy.period_ms, policy.capacity, policy.block_ms)


def model_check(models: Sequence[Model], now: int, cost: int, *, consume: bool) -> list[Outcome]:
    """Check *cost* against every model at once: all-or-nothing, blocks on denial."""
    admitted = all(m.allows(now, cost) for m in models)
    charge = admitted and consume
    outcomes = []
    for m in models:
        if charge:
            outcomes.append(m.outcome(now, cost, cost))
        elif m.allows(now, cost):
            outcomes.append(m.outcome(now, cost, 0)._replace(retry_after_ms=0))
        else:
            outcomes.append(m.outcome(now, cost, 0))
    if charge:
        for m in models:
            m.charge(now, cost)
    elif consume:
        for i, m in enumerate(models):
            if not m.allows(now, cost) and m.block and now >= m.blocked_until:
                m.blocked_until = now + m.block
                if m.outlived_by(m.block):
                    m.forget()
                outcomes[i] = m.outcome(now, cost, 0)
    return outcomes
