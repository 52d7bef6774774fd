from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilient import ConfigurationError, Rate, SlidingWindow, TokenBucket
from resilient.ratelimit.core import (
    Algorithm,
    Outcome,
    Policy,
    State,
    charge,
    combine,
    decision_of,
    evaluate,
)
from tests.ratelimit.model import model_check, model_of
from tests.ratelimit.strategies import Step, traces


@pytest.mark.parametrize(
    ("text", "limit", "period"),
    [
        ("100/minute", 100, 60.0),
        ("10/second", 10, 1.0),
        ("5/15minutes", 5, 900.0),
        ("1000 per day", 1000, 86400.0),
        ("3/500ms", 3, 0.5),
        ("  7 / 2h ", 7, 7200.0),
        ("1/1.5s", 1, 1.5),
        ("2/HOUR", 2, 3600.0),
    ],
)
def test_rate_parses_common_spellings(text: str, limit: int, period: float) -> None:
    assert Rate.parse(text) == Rate(limit, period)


@pytest.mark.parametrize(
    "text", ["", "100", "minute", "0/minute", "-1/minute", "10/fortnight", "10/0s", "1.5/s", "x/s"]
)
def test_rate_rejects_junk_with_a_clear_message(text: str) -> None:
    with pytest.raises(ConfigurationError, match="rate"):
        Rate.parse(text)


def test_rate_rejects_non_strings() -> None:
    with pytest.raises(ValueError, match="a rate is a string"):
        Rate.parse(100)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["100/minute", "5/15minutes", "3/500ms", "1/day", "7/2hours"])
def test_rate_str_round_trips(text: str) -> None:
    assert Rate.parse(str(Rate.parse(text))) == Rate.parse(text)


def test_policies_reject_bad_arguments() -> None:
    with pytest.raises(ConfigurationError, match="burst"):
        TokenBucket("10/second", burst=0)
    with pytest.raises(ConfigurationError, match="block_for"):
        SlidingWindow("10/second", block_for=-1)
    with pytest.raises(ConfigurationError, match="from 0 to ten years"):
        TokenBucket("10/second", block_for=1e12)  # its end would outgrow exact doubles
    with pytest.raises(ConfigurationError, match="too large"):
        SlidingWindow(Rate(10**9, 86400 * 365))
    with pytest.raises(ConfigurationError, match="policy name"):
        SlidingWindow("1/second", name='say "hi"')
    with pytest.raises(TypeError, match="abstract"):
        Policy(Rate(1, 1.0))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Rate(5, "1"), "period must be a number"),  # type: ignore[arg-type]
        (lambda: Rate(5, True), "period must be a number"),
        (lambda: TokenBucket("1/second", block_for="5"), "block_for"),  # type: ignore[arg-type]
        (lambda: SlidingWindow("1/second", block_for=True), "block_for"),
        (lambda: TokenBucket("1/second", name=5), "policy name"),  # type: ignore[arg-type]
        (lambda: SlidingWindow("1/second", name="caf\u00e9"), "policy name"),
    ],
)
def test_policies_refuse_arguments_of_the_wrong_type(make, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigurationError, match=message):
        make()


def test_each_policy_names_its_algorithm_by_the_code_the_script_reads() -> None:
    assert SlidingWindow("5/minute").kind is Algorithm.SLIDING_WINDOW
    assert TokenBucket("5/minute").kind is Algorithm.TOKEN_BUCKET
    assert [int(a) for a in Algorithm] == [1, 2]  # lua/ratelimit.lua's codes


@pytest.mark.parametrize("cost", [-1, True, 1.0, 6])
def test_the_core_refuses_costs_a_policy_cannot_take(cost: int) -> None:
    bucket = TokenBucket("5/second")
    with pytest.raises(ConfigurationError, match="cost"):
        evaluate([bucket], [None], 0, cost)
    with pytest.raises(ConfigurationError, match="cost"):
        charge(bucket, None, 0, cost)


def test_the_core_refuses_times_that_are_not_whole_milliseconds() -> None:
    with pytest.raises(ConfigurationError, match="now_ms"):
        evaluate([TokenBucket("5/second")], [None], 1.5, 1)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="now_ms"):
        charge(TokenBucket("5/second"), None, None, 1)  # type: ignore[arg-type]


def test_a_policys_step_is_what_charge_reports() -> None:
    window = SlidingWindow("3/second", block_for=10)
    state: State | None = None
    for now in (0, 10, 20, 30, 1_500):
        allowed, remaining, reset, retry, after, ttl = window.step(state, now, 1)
        outcome, charged, charged_ttl = charge(window, state, now, 1)
        assert outcome == Outcome(allowed, remaining, reset, retry)
        assert (charged, charged_ttl) == (after, ttl)
        state = after


def test_a_decision_is_an_outcome_in_seconds_against_the_policys_capacity() -> None:
    bucket = TokenBucket("10/second", burst=20)
    decision = decision_of(bucket, *Outcome(False, 0, 1_250, 100))
    assert decision.per_policy == (decision,)
    assert decision == (False, 20, 0, 1.25, 0.1, bucket, (), False)
    degraded = decision_of(bucket, True, 20, 0, 0, degraded=True)
    assert degraded == (True, 20, 20, 0.0, 0.0, bucket, (), True)


def test_policies_compare_and_hash_by_configuration() -> None:
    assert SlidingWindow("5/minute") == SlidingWindow(Rate(5, 60))
    assert hash(SlidingWindow("5/minute")) == hash(SlidingWindow("5/minute"))
    assert SlidingWindow("5/minute") != TokenBucket("5/minute")  # type: ignore[comparison-overlap]
    assert SlidingWindow("5/minute").id != SlidingWindow("5/minute", block_for=60).id
    assert TokenBucket("10/second", burst=20).window == 2.0


def _run(policy: Policy, trace: list[tuple[int, int]]) -> list[Outcome]:
    state: State | None = None
    outcomes = []
    for now, cost in trace:
        [outcome], [write] = evaluate([policy], [state], now, cost)
        if write is not None:
            state = write.state
        outcomes.append(outcome)
    return outcomes


def test_sliding_window_weights_the_previous_window() -> None:
    policy = SlidingWindow("10/second")
    outcomes = _run(policy, [(500, 10), (1100, 1), (1100, 1), (1200, 1)])
    # At 1.1 s the previous window still weighs 90%: 10 * 0.9 + 1 fits, + 2 does not;
    # at 1.2 s it weighs 80%: 10 * 0.8 + 2 fits.
    assert [o.allowed for o in outcomes] == [True, True, False, True]
    assert outcomes[2].retry_after_ms == 100


def test_token_bucket_keeps_fractions_of_a_token() -> None:
    policy = TokenBucket("3/second", burst=1)
    # 1/3 token per 111 ms would floor to nothing; three such steps make a whole token.
    outcomes = _run(policy, [(0, 1), (334, 1)])
    assert [o.allowed for o in outcomes] == [True, True]
    outcomes = _run(policy, [(0, 1), (333, 1)])
    assert [o.allowed for o in outcomes] == [True, False]
    assert outcomes[1].retry_after_ms == 1


def test_a_denied_check_charges_no_policy() -> None:
    loose, tight = SlidingWindow("10/second"), TokenBucket("1/second")
    states: list[State | None] = [None, None]
    outcomes, writes = evaluate([loose, tight], states, 0, 1)
    states = [w.state if w else s for w, s in zip(writes, states, strict=True)]
    outcomes, writes = evaluate([loose, tight], states, 1, 1)
    assert [o.allowed for o in outcomes] == [True, False]
    assert writes == [None, None]
    assert outcomes[0].remaining == 9  # not charged for the denied check


def test_block_for_keeps_denying_after_a_denial() -> None:
    policy = SlidingWindow("1/second", block_for=10)
    outcomes = _run(policy, [(0, 1), (10, 1), (5000, 1), (10_009, 1), (10_010, 1)])
    assert [o.allowed for o in outcomes] == [True, False, False, False, True]
    assert outcomes[1].retry_after_ms == 10_000
    assert outcomes[2].retry_after_ms == 5010


def test_combine_reports_the_binding_policy() -> None:
    loose, tight = SlidingWindow("10/second"), TokenBucket("2/second")
    allowed = combine([loose, tight], [Outcome(True, 9, 10, 0), Outcome(True, 1, 500, 0)])
    assert allowed.policy is tight
    assert (allowed.limit, allowed.remaining) == (2, 1)
    assert allowed.per_policy[0].remaining == 9
    denied = combine([loose, tight], [Outcome(False, 0, 10, 300), Outcome(False, 0, 5, 700)])
    assert denied.policy is tight
    assert denied.retry_after == 0.7
    single = combine([loose], [Outcome(True, 3, 1500, 0)])
    assert single.per_policy == (single,)
    assert single.reset_after == 1.5


@given(traces())
def test_core_decides_like_the_model(trace: tuple[list[Policy], list[Step]]) -> None:
    pool, steps = trace
    models = [model_of(p) for p in pool]
    states: list[State | None] = [None] * len(pool)
    expires = [0] * len(pool)
    now = 1_700_000_000_000
    for step in steps:
        now += step.advance_ms
        policies = [pool[i] for i in step.which]
        if step.action == "reset":
            for i in step.which:
                states[i] = None
                models[i] = model_of(pool[i])
            continue
        # State past its TTL is gone, as it would be in any store.
        current = [states[i] if expires[i] > now else None for i in step.which]
        consume = step.action == "hit"
        outcomes, writes = evaluate(policies, current, now, step.cost, consume=consume)
        expected = model_check([models[i] for i in step.which], now, step.cost, consume=consume)
        assert outcomes == expected, (step, now)
        for i, write in zip(step.which, writes, strict=True):
            if write is not None:
                assert write.ttl_ms >= 1
                states[i], expires[i] = write.state, now + write.ttl_ms


@given(traces())
def test_decisions_never_report_negative_or_infinite_durations(
    trace: tuple[list[Policy], list[Step]],
) -> None:
    pool, steps = trace
    states: list[State | None] = [None] * len(pool)
    now = 0
    for step in steps:
        now += step.advance_ms
        policies = [pool[i] for i in step.which]
        current = [states[i] for i in step.which]
        outcomes, writes = evaluate(policies, current, now, step.cost)
        decision = combine(policies, outcomes)
        assert 0 <= decision.remaining <= decision.limit
        assert math.isfinite(decision.retry_after)
        assert decision.retry_after >= 0
        assert decision.allowed == (decision.retry_after == 0)
        for i, write in zip(step.which, writes, strict=True):
            if write is not None:
                states[i] = write.state


WINDOW_START = 1_800_000_000_000 - 1_800_000_000_000 % 900_000  # a 15-minute boundary


@given(
    phase=st.integers(0, 899_999),
    gap=st.integers(0, 120_000),
    block=st.sampled_from([900, 901, 1000, 1800, 3600]),
    during=st.lists(st.integers(1, 900_000), max_size=4),
)
def test_a_block_as_long_as_the_window_lasts_exactly_that_long_at_any_phase(
    phase: int, gap: int, block: int, during: list[int]
) -> None:
    # The shop's login rule. Its block used to be max(block, the window's own wait), and
    # the window's wait depends on where in its fixed window the count falls: 900 s on a
    # clock that starts late in a window, up to 1,080 s on one that starts early.
    policy = SlidingWindow("5/15minutes", block_for=block)
    state: State | None = None
    now = WINDOW_START + phase
    for _ in range(20):  # hits until the first denial
        [outcome], [write] = evaluate([policy], [state], now, 1)
        if write is not None:
            state = write.state
        if not outcome.allowed:
            break
        now += gap
    assert outcome == Outcome(False, 0, block * 1000, block * 1000)
    end = now + block * 1000
    for elapsed in sorted(during):  # hits while blocked: the wait counts down, exactly
        if now + elapsed >= end:
            break
        [outcome], [write] = evaluate([policy], [state], now + elapsed, 1)
        assert outcome == Outcome(False, 0, end - now - elapsed, end - now - elapsed)
        assert write is None  # a hit during the block neither counts nor extends it
    [outcome], [write] = evaluate([policy], [state], end, 1)
    assert outcome.allowed
    assert outcome.remaining == 4  # the block outlived every hit counted before it


def test_a_block_shorter_than_the_window_keeps_the_windows_count() -> None:
    # A short block must never make a policy more lenient than the window alone.
    policy = SlidingWindow("2/minute", block_for=10)
    outcomes = _run(policy, [(0, 1), (0, 1), (0, 1), (10_000, 1), (60_000, 1), (90_000, 1)])
    assert [o.allowed for o in outcomes] == [True, True, False, False, False, True]
    assert outcomes[2] == Outcome(False, 0, 120_000, 90_000)
    assert outcomes[3].retry_after_ms == 80_000
