"""``BreakerRegistry``: bounded whatever the breakers' states, O(1) amortised per new key.

The work is counted, not timed: the breakers read are counted through the one thing the
registry asks of them, their ``state``. A plain model (lists, scanned) says which breaker
each new key drops.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilient.breaker import BreakerRegistry, CircuitBreaker, State
from resilient.testing import FakeClock


class Counted(CircuitBreaker):
    """A breaker whose state reads are counted (the registry's work per key)."""

    reads: ClassVar[int] = 0

    @property
    def state(self) -> State:
        Counted.reads += 1
        return super().state


def counted(key: str) -> CircuitBreaker:
    return Counted(key, observer=None)


def plain(key: str) -> CircuitBreaker:
    return CircuitBreaker(key, observer=None)


def test_a_new_key_in_a_registry_full_of_open_breakers_costs_o1_and_stays_bounded() -> None:
    size, new = 2_000, 2_000
    registry = BreakerRegistry(counted, max_size=size)
    for i in range(size):
        registry.get(f"down:{i}").force_open()  # every host down
    Counted.reads = 0
    largest = 0
    for i in range(new):
        registry.get(f"new:{i}")
        largest = max(largest, len(registry))
    # Each new key reads its own breaker's state, and each breaker found no longer closed
    # is read once as it moves aside: O(1) amortised (a scan per key would be ~size * new).
    assert Counted.reads <= 2 * new + size
    assert largest == len(registry) == size


def test_a_registry_full_of_closed_breakers_drops_one_per_new_key_reading_one() -> None:
    registry = BreakerRegistry(counted, max_size=1_000)
    for i in range(1_000):
        registry.get(f"old:{i}")
    Counted.reads = 0
    for i in range(1_000):
        registry.get(f"new:{i}")
    assert Counted.reads <= 2 * 1_000  # the new breaker's, and the one dropped
    assert {b.name for b in registry} == {f"new:{i}" for i in range(1_000)}


def test_the_least_recently_used_closed_breaker_goes_first() -> None:
    registry = BreakerRegistry(plain, max_size=3)
    a, _, c = (registry.get(k) for k in "abc")
    a.force_open()
    c.force_open()
    registry.get("d")
    assert {br.name for br in registry} == {"a", "c", "d"}  # b, the closed one, went
    assert registry.get("a") is a
    assert registry.get("c") is c


def test_with_every_breaker_open_or_half_open_the_least_recently_used_goes() -> None:
    clock = FakeClock()
    registry = BreakerRegistry(
        lambda key: CircuitBreaker(
            key, minimum_calls=1, window=1, open_for=10.0, clock=clock, observer=None
        ),
        max_size=3,
    )
    for key in "abc":
        breaker = registry.get(key)
        with pytest.raises(ZeroDivisionError):
            breaker.call(lambda: 1 / 0)
        assert breaker.state is State.OPEN
    clock.advance(11)  # now half-open, all three
    registry.get("b")  # b and then c are more recently used than a
    registry.get("c")
    registry.get("d")
    assert len(registry) == 3
    assert {br.name for br in registry} == {"b", "c", "d"}


# -- the model ---------------------------------------------------------------------------


class Model:
    """The registry's rule on plain lists: breakers last found closed, and the others,
    each least recently used first; room is made from the closed ones, and a breaker
    found there no longer closed moves to the end of the others; with none closed, the
    least recently used of the others goes."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.closed: list[str] = []
        self.others: list[str] = []
        self.breakers: dict[str, CircuitBreaker] = {}

    def file(self, key: str) -> None:
        for queue in (self.closed, self.others):
            if key in queue:
                queue.remove(key)
        is_closed = self.breakers[key].state is State.CLOSED
        (self.closed if is_closed else self.others).append(key)

    def get(self, key: str, made: CircuitBreaker) -> None:
        if key not in self.breakers:
            if len(self.breakers) >= self.max_size:
                self.make_room()
            self.breakers[key] = made
        self.file(key)

    def make_room(self) -> None:
        opened: list[str] = []
        dropped = None
        while self.closed:
            key = self.closed.pop(0)
            if self.breakers[key].state is State.CLOSED:
                dropped = key
                break
            opened.append(key)
        self.others = opened + self.others
        if dropped is None:
            dropped = self.others.pop(0)
        del self.breakers[dropped]


KEYS = st.sampled_from([f"k{i}" for i in range(6)])
STEPS = st.lists(
    st.tuples(st.sampled_from(["get", "open", "close"]), KEYS), min_size=1, max_size=60
)


@given(max_size=st.integers(1, 4), steps=STEPS)
def test_the_registry_drops_what_the_model_drops(
    max_size: int, steps: list[tuple[str, str]]
) -> None:
    registry = BreakerRegistry(plain, max_size=max_size)
    model = Model(max_size)
    for action, key in steps:
        if action == "get":
            breaker = registry.get(key)
            known = model.breakers.get(key)
            if known is not None:
                assert breaker is known  # kept: the same breaker, its state with it
            model.get(key, breaker)
        elif key in model.breakers:  # the breaker's state changes while it is held
            breaker = model.breakers[key]
            breaker.force_open() if action == "open" else breaker.reset()
        assert len(registry) <= max_size
        assert {b.name for b in registry} == set(model.breakers)
