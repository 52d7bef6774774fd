"""The pure parts: jitter formulas (bounds and distributions) and Retry-After parsing."""

from __future__ import annotations

import email.utils
import random
import statistics
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilient import BackendUnavailable, CircuitOpenError
from resilient.retries.core import JITTERS, Jitter, backoff, parse_retry_after, retry_after_of

SAMPLES = 20_000
NOW = 1_700_000_000.0


def draws(jitter: Jitter, retry: int, *, base: float, cap: float, previous: float) -> list[float]:
    rng = random.Random(1234)
    return [backoff(jitter, retry, previous, base=base, cap=cap, rng=rng) for _ in range(SAMPLES)]


@pytest.mark.parametrize("retry", range(10))
def test_full_jitter_is_uniform_below_the_exponential_ceiling(retry: int) -> None:
    ceiling = min(10.0, 0.1 * 2**retry)
    waits = draws("full", retry, base=0.1, cap=10.0, previous=0.1)
    assert all(0.0 <= w <= ceiling for w in waits)
    assert statistics.fmean(waits) == pytest.approx(ceiling / 2, rel=0.02)
    assert max(waits) > 0.99 * ceiling  # the whole range is used, up to the ceiling
    assert min(waits) < 0.01 * ceiling


@pytest.mark.parametrize("retry", range(10))
def test_equal_jitter_keeps_half_of_the_ceiling(retry: int) -> None:
    ceiling = min(10.0, 0.1 * 2**retry)
    waits = draws("equal", retry, base=0.1, cap=10.0, previous=0.1)
    assert all(ceiling / 2 <= w <= ceiling for w in waits)
    assert statistics.fmean(waits) == pytest.approx(0.75 * ceiling, rel=0.01)


@pytest.mark.parametrize("previous", [0.1, 0.5, 2.0, 3.3, 9.0, 10.0])
def test_decorrelated_jitter_draws_from_base_to_three_times_the_previous_wait(
    previous: float,
) -> None:
    upper = min(10.0, 3 * previous)
    waits = draws("decorrelated", 0, base=0.1, cap=10.0, previous=previous)
    assert all(0.1 <= w <= upper for w in waits)
    assert statistics.fmean(waits) == pytest.approx((0.1 + upper) / 2, rel=0.02)


def test_decorrelated_jitter_does_not_collapse_to_the_cap() -> None:
    rng = random.Random(99)
    previous, chain = 0.1, []
    for retry in range(5_000):
        previous = backoff("decorrelated", retry, previous, base=0.1, cap=1.0, rng=rng)
        chain.append(previous)
    steady = chain[100:]
    assert all(0.1 <= w <= 1.0 for w in chain)
    assert max(steady) < 1.0  # never pinned to the cap...
    assert sum(w < 0.5 for w in steady) > len(steady) / 4  # ...and spread below it
    assert statistics.pstdev(steady) > 0.2


def test_doubling_stops_before_it_overflows() -> None:
    rng = random.Random(0)
    assert 0 <= backoff("full", 10_000, 0.1, base=0.1, cap=3.0, rng=rng) <= 3.0
    assert 1.5 <= backoff("equal", 10_000, 0.1, base=0.1, cap=3.0, rng=rng) <= 3.0


@given(
    jitter=st.sampled_from(JITTERS),
    retry=st.integers(0, 500),
    base=st.floats(1e-3, 100.0),
    spread=st.floats(1.0, 1e4),
    seed=st.integers(0, 2**32),
    previous_share=st.floats(0.0, 1.0),
)
def test_every_wait_lies_between_zero_and_the_cap(
    *, jitter: Jitter, retry: int, base: float, spread: float, seed: int, previous_share: float
) -> None:
    cap = base * spread
    previous = base + (cap - base) * previous_share
    wait = backoff(jitter, retry, previous, base=base, cap=cap, rng=random.Random(seed))
    assert 0.0 <= wait <= cap
    if jitter == "decorrelated":
        assert base <= wait


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("120", 120.0), (" 0 ", 0.0), ("1.5", 1.5), ("-1", None), ("nan", None), ("soon", None)],
)
def test_retry_after_in_seconds(value: str, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


def test_retry_after_as_an_http_date() -> None:
    in_five = email.utils.formatdate(NOW + 5, usegmt=True)
    assert parse_retry_after(in_five, NOW) == 5.0
    past = email.utils.formatdate(NOW - 60, usegmt=True)
    assert parse_retry_after(past, NOW) == 0.0
    assert parse_retry_after("Mon, 99 Foo 2024 99:99:99 GMT", NOW) is None


@pytest.mark.parametrize(
    ("outcome", "seconds"),
    [
        (httpx.Response(429, headers={"Retry-After": "7"}), 7.0),
        (httpx.Response(503, headers={"retry-after": "2.5"}), 2.5),
        (httpx.Response(503), None),
        (BackendUnavailable("redis is down", retry_after=1.0), 1.0),
        (CircuitOpenError("open", breaker="payments", retry_after=30.0), 30.0),
        (ValueError("no hint"), None),
        (None, None),
    ],
)
def test_retry_after_of_responses_and_exceptions(outcome: object, seconds: float | None) -> None:
    assert retry_after_of(outcome, NOW) == seconds


def test_retry_after_of_an_http_status_error_reads_its_response() -> None:
    request = httpx.Request("GET", "https://api.example/")
    response = httpx.Response(429, headers={"Retry-After": "3"}, request=request)
    error = httpx.HTTPStatusError("429", request=request, response=response)
    assert retry_after_of(error, NOW) == 3.0


class Hinted(Exception):
    def __init__(self, retry_after: Any) -> None:
        self.retry_after = retry_after


@pytest.mark.parametrize("bad", [-1.0, float("inf"), True, "3"])
def test_a_nonsense_retry_after_attribute_is_ignored(bad: object) -> None:
    assert retry_after_of(Hinted(bad), NOW) is None


@pytest.mark.parametrize("headers", [{"Retry-After": b"4"}, {"retry-after": "4"}])
def test_plain_mappings_of_headers_work_too(headers: dict[str, Any]) -> None:
    class Reply:
        def __init__(self, headers: dict[str, Any]) -> None:
            self.headers = headers

    assert retry_after_of(Reply(headers), NOW) == 4.0
