"""A plain model of the circuit breaker, written for clarity, not speed."""

from __future__ import annotations

import math
from fractions import Fraction

from resilient.breaker.core import FAILED, SLOW, BreakerConfig, State


class ModelBreaker:
    def __init__(self, config: BreakerConfig) -> None:
        self.c = config
        self.state = State.CLOSED
        self.generation = 0
        self.outcomes: list[tuple[float, int]] = []
        self.open_until = 0.0
        self.open_for = config.open_for
        self.trips = 0
        self.probes_out = 0
        self.probes: list[int] = []

    def _window(self, now: float) -> list[int]:
        if self.c.window_type == "count":
            return [flags for _, flags in self.outcomes[-int(self.c.window) :]]
        width = max(1.0, self.c.window / 60)
        buckets = math.ceil(self.c.window / width)
        newest = math.floor(now / width)
        return [f for t, f in self.outcomes if math.floor(t / width) > newest - buckets]

    def _move(self, state: State) -> None:
        self.state = state
        self.generation += 1
        self.probes_out = 0
        self.probes = []

    def _open(self, now: float) -> None:
        if self.state is State.HALF_OPEN:
            self.trips += 1
            self.open_for = min(
                self.c.open_for * self.c.open_for_growth**self.trips, self.c.max_open_for
            )
        self.open_until = now + self.open_for
        self._move(State.OPEN)

    def _close(self) -> None:
        self.trips = 0
        self.open_for = self.c.open_for
        self.outcomes = []
        self._move(State.CLOSED)

    def admit(self, now: float) -> int | None:
        if self.state in (State.CLOSED, State.DISABLED):
            return self.generation
        if self.state is State.FORCED_OPEN:
            return None
        if self.state is State.OPEN:
            if now < self.open_until:
                return None
            self._move(State.HALF_OPEN)
        if self.probes_out >= self.c.half_open_calls:
            return None
        self.probes_out += 1
        return self.generation

    def release(self, generation: int) -> None:
        if generation == self.generation and self.state is State.HALF_OPEN:
            self.probes_out -= 1

    def record(self, generation: int, flags: int, now: float) -> None:
        if generation != self.generation:
            return
        failure_rate = Fraction(str(self.c.failure_rate))
        slow_rate = Fraction(str(self.c.slow_call_rate))
        if self.state is State.CLOSED:
            self.outcomes.append((now, flags))
            window = self._window(now)
            calls = len(window)
            failures = sum(1 for f in window if f & FAILED)
            slows = sum(1 for f in window if f & SLOW)
            if calls >= self.c.minimum_calls and (
                Fraction(failures, calls) >= failure_rate or Fraction(slows, calls) >= slow_rate
            ):
                self._open(now)
        elif self.state is State.HALF_OPEN:
            self.probes.append(flags)
            n = len(self.probes)
            if n < self.c.half_open_calls:
                return
            failures = sum(1 for f in self.probes if f & FAILED)
            slows = sum(1 for f in self.probes if f & SLOW)
            if Fraction(failures, n) >= failure_rate or Fraction(slows, n) >= slow_rate:
                self._open(now)
            else:
                self._close()

    def force(self, state: State) -> None:
        if state is State.CLOSED:
            if self.state is State.CLOSED:
                self.outcomes = []
            else:
                self._close()
        elif self.state is not state:
            self._move(state)

    def reset(self) -> None:
        if self.state is not State.CLOSED:
            self._close()
        self.trips = 0
        self.open_for = self.c.open_for
        self.outcomes = []
