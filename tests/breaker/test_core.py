"""The breaker's state machine against the plain model, on random traces."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from resilient.breaker.core import (
    FAILED,
    SLOW,
    BreakerConfig,
    BreakerCore,
    CountWindow,
    State,
    TimeWindow,
    make_config,
)
from resilient.errors import ConfigurationError
from tests.breaker.model import ModelBreaker

FLAGS = st.sampled_from([0, 0, 0, FAILED, SLOW, FAILED | SLOW])
DEFAULTS: dict[str, Any] = {
    "failure_rate": 0.5,
    "slow_call_rate": 1.0,
    "minimum_calls": 5,
    "window": 10,
    "window_type": "count",
    "open_for": 5.0,
    "open_for_growth": 1.0,
    "max_open_for": None,
    "half_open_calls": 1,
}


def config(**options: Any) -> BreakerConfig:
    """:func:`make_config` of *options*, the others from :data:`DEFAULTS`."""
    return make_config(**{**DEFAULTS, **options})


@st.composite
def configs(draw: st.DrawFn) -> BreakerConfig:
    window_type = draw(st.sampled_from(["count", "time"]))
    if window_type == "count":
        window: float = draw(st.integers(1, 12))
        minimum = draw(st.integers(1, int(window)))
    else:
        window = draw(st.sampled_from([1, 2.5, 5, 10, 90, 150]))
        minimum = draw(st.integers(1, 8))
    open_for = draw(st.sampled_from([0.5, 1.0, 3.0]))
    return make_config(
        failure_rate=draw(st.sampled_from([0.1, 0.25, 1 / 3, 0.5, 0.7, 1.0])),
        slow_call_rate=draw(st.sampled_from([0.3, 0.5, 1.0])),
        minimum_calls=minimum,
        window=window,
        window_type=window_type,
        open_for=open_for,
        open_for_growth=draw(st.sampled_from([1.0, 2.0])),
        max_open_for=open_for * draw(st.sampled_from([1, 4])),
        half_open_calls=draw(st.integers(1, 4)),
    )


class BreakerMachine(RuleBasedStateMachine):
    calls = Bundle("calls")

    def __init__(self) -> None:
        super().__init__()
        self.core: BreakerCore | None = None
        self.model: ModelBreaker | None = None
        self.now = 1000.0

    @initialize(config=configs())
    def configure(self, config: BreakerConfig) -> None:
        self.core = BreakerCore(config)
        self.model = ModelBreaker(config)

    @rule(dt=st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.5, 7.0, 40.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(target=calls)
    def admit(self) -> int:
        if self.core is None or self.model is None:
            return -1
        got, _ = self.core.admit(self.now)
        assert got == self.model.admit(self.now)
        return -1 if got is None else got

    @rule(call=calls, flags=FLAGS)
    def record(self, call: int, flags: int) -> None:
        if self.core is None or self.model is None or call < 0:
            return
        self.core.record(call, flags, self.now)
        self.model.record(call, flags, self.now)

    @rule(call=calls)
    def release(self, call: int) -> None:
        if self.core is None or self.model is None or call < 0:
            return
        self.core.release(call)
        self.model.release(call)

    @rule(flags=FLAGS)
    def call_now(self, flags: int) -> None:
        """Admit and finish at once: the common case, so traces go far."""
        if self.core is None or self.model is None:
            return
        got, _ = self.core.admit(self.now)
        assert got == self.model.admit(self.now)
        if got is not None:
            self.core.record(got, flags, self.now)
            self.model.record(got, flags, self.now)

    @rule(state=st.sampled_from([State.CLOSED, State.FORCED_OPEN, State.DISABLED]))
    def force(self, state: State) -> None:
        if self.core is None or self.model is None:
            return
        self.core.force(state, "test")
        self.model.force(state)

    @rule()
    def reset(self) -> None:
        if self.core is None or self.model is None:
            return
        self.core.reset()
        self.model.reset()

    @invariant()
    def agrees(self) -> None:
        if self.core is None or self.model is None:
            return
        assert self.core.state is self.model.state
        assert self.core.generation == self.model.generation
        assert self.core.probes_out == self.model.probes_out
        if self.core.state is State.OPEN:
            assert self.core.open_until == pytest.approx(self.model.open_until)
        assert self.core.open_for == pytest.approx(self.model.open_for)


TestBreakerAgainstModel = BreakerMachine.TestCase
TestBreakerAgainstModel.settings = settings(max_examples=300, stateful_step_count=60)


@given(st.lists(FLAGS, max_size=50), st.integers(1, 10))
def test_count_window_totals(flags: list[int], size: int) -> None:
    window = CountWindow(size)
    for f in flags:
        window.record(f, 0.0)
    last = flags[-size:]
    assert window.totals(0.0) == (
        len(last),
        sum(1 for f in last if f & FAILED),
        sum(1 for f in last if f & SLOW),
    )
    assert window.clean == (len(last) == size and not any(last))


@given(st.lists(st.tuples(st.floats(0, 5), FLAGS), max_size=40), st.sampled_from([1, 3, 10]))
def test_time_window_totals(steps: list[tuple[float, int]], seconds: int) -> None:
    window = TimeWindow(seconds, width=1.0)
    now, seen = 0.0, []
    for dt, f in steps:
        now += dt
        window.record(f, now)
        seen.append((now, f))
    inside = [f for t, f in seen if int(t) > int(now) - seconds]
    assert window.totals(now) == (
        len(inside),
        sum(1 for f in inside if f & FAILED),
        sum(1 for f in inside if f & SLOW),
    )


def test_rates_are_exact_decimals() -> None:
    config = make_config(
        failure_rate=0.1,
        slow_call_rate=1.0,
        minimum_calls=30,
        window=30,
        window_type="count",
        open_for=1,
        open_for_growth=1,
        max_open_for=None,
        half_open_calls=1,
    )
    core = BreakerCore(config)
    for i in range(29):
        core.record(0, FAILED if i < 2 else 0, 0.0)
    core.record(0, FAILED, 0.0)
    assert core.state is State.OPEN  # 3/30 is 0.1 exactly
    core = BreakerCore(config)
    for i in range(30):
        core.record(0, FAILED if i < 2 else 0, 0.0)
    assert core.state is State.CLOSED  # 2/30 is not
    core = BreakerCore(config)
    for i in range(30):
        core.record(0, FAILED if i >= 27 else 0, 0.0)
    assert core.state is State.OPEN  # 3/30 is 0.1 exactly


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"failure_rate": 0}, "failure_rate must be a fraction"),
        ({"failure_rate": 1.5}, "failure_rate must be a fraction"),
        ({"slow_call_rate": True}, "slow_call_rate must be"),
        ({"minimum_calls": 0}, "minimum_calls must be a positive integer"),
        ({"half_open_calls": 1.5}, "half_open_calls must be"),
        ({"window": 2.5}, "count-based window"),
        ({"window_type": "sliding"}, "window_type must be"),
        ({"window": 5, "minimum_calls": 6}, "could never open"),
        ({"open_for": 0}, "open_for must be"),
        ({"open_for_growth": 0.5}, "open_for_growth must be"),
        ({"max_open_for": 1}, "max_open_for must be"),
        ({"window_type": "time", "window": float("inf")}, "window must be finite"),
    ],
)
def test_bad_configuration_is_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        config(**options)


def test_open_for_grows_on_each_reopening_up_to_its_cap_and_resets_on_close() -> None:
    config = make_config(
        failure_rate=0.5,
        slow_call_rate=1.0,
        minimum_calls=2,
        window=2,
        window_type="count",
        open_for=1.0,
        open_for_growth=3.0,
        max_open_for=5.0,
        half_open_calls=1,
    )
    core, model = BreakerCore(config), ModelBreaker(config)
    now = 0.0
    for _ in range(2):
        for b in (core, model):
            b.record(0, FAILED, now)
    assert core.state is State.OPEN
    opened_for = []
    for _ in range(3):  # the probe fails each time: 1 s, then 3 s, then 5 s (capped)
        now = core.open_until
        generation, _ = core.admit(now)
        assert generation == model.admit(now)
        assert generation is not None
        core.record(generation, FAILED, now)
        model.record(generation, FAILED, now)
        opened_for.append(core.open_until - now)
        assert core.open_for == model.open_for
    assert opened_for == [3.0, 5.0, 5.0]
    now = core.open_until
    generation, _ = core.admit(now)
    assert generation is not None
    core.record(generation, 0, now)
    assert core.state.value == "closed"  # (mypy narrowed the state above)
    assert core.open_for == 1.0


@example(opened_at=0.014646174039934602, waited=0.07188354727617899, open_for=5.0)
@given(
    opened_at=st.floats(0, 1e6, allow_nan=False),
    waited=st.floats(0, 1, allow_nan=False),
    open_for=st.sampled_from([0.1, 1.0, 5.0, 30.0]),
)
def test_a_call_made_retry_after_seconds_later_is_admitted(
    opened_at: float, waited: float, open_for: float
) -> None:
    # Seen as a rare failure of the transport's retry: it waited exactly retry_after on a
    # fake clock (now + (open_until - now) rounded to just below open_until) and was
    # rejected again, with "retry in 0.000s".
    core = BreakerCore(config(failure_rate=1.0, minimum_calls=1, window=1, open_for=open_for))
    core.record(0, FAILED, opened_at)
    assert core.state is State.OPEN
    now = opened_at + waited
    retry_after = core.retry_after(now)
    assert retry_after == pytest.approx(max(0.0, opened_at + open_for - now), abs=1e-9)
    admitted, _ = core.admit(now + retry_after)
    assert admitted is not None


def test_retry_after_is_exact_when_the_sum_is() -> None:
    core = BreakerCore(config(failure_rate=1.0, minimum_calls=1, window=1, open_for=10.0))
    core.record(0, FAILED, 0.0)
    assert core.retry_after(0.0) == 10.0
    assert core.retry_after(9.5) == 0.5
    assert core.retry_after(10.0) == 0.0
