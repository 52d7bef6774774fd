"""KeySetCache: the decisions both JWKS clients make, driven by hand, with no I/O."""

from __future__ import annotations

import pytest

from resilient.auth.core import KeySetCache, Lookup, Need, SigningKey
from resilient.errors import ConfigurationError, KeySetUnavailable, UnknownKey
from resilient.testing import FakeClock

KEY = SigningKey(kid="k1", kty="OKP", crv="Ed25519", alg="EdDSA", key=None)


def finish(lookup: Lookup, failure: KeySetUnavailable | None = None) -> SigningKey:
    """Send the end of the fetch the lookup waits for; return what it returns."""
    with pytest.raises(StopIteration) as done:
        lookup.send(failure)
    key: SigningKey = done.value.value
    return key


def test_a_cold_cache_fetches_once_and_concurrent_lookups_wait_for_that_fetch() -> None:
    clock, cache = FakeClock(), KeySetCache()
    first, second = cache.lookup("k1", clock), cache.lookup("k1", clock)
    assert next(first) is Need.FETCH
    assert next(second) is Need.WAIT
    cache.fetched({"k1": KEY}, cache.ttl_for("max-age=120"), clock.monotonic())
    assert finish(first) is KEY
    assert finish(second) is KEY
    assert cache.fresh_key("k1", clock.monotonic()) is KEY
    clock.advance(120)
    assert cache.fresh_key("k1", clock.monotonic()) is None


def test_an_unknown_kid_refetches_at_most_once_per_cooldown() -> None:
    clock, cache = FakeClock(), KeySetCache(refetch_cooldown=30)
    warm = cache.lookup("k1", clock)
    next(warm)
    cache.fetched({"k1": KEY}, 300, clock.monotonic())
    finish(warm)
    with pytest.raises(UnknownKey):
        next(cache.lookup("other", clock))  # inside the cooldown: no fetch
    clock.advance(30)
    lookup = cache.lookup("other", clock)
    assert next(lookup) is Need.FETCH
    cache.fetched({"k1": KEY}, 300, clock.monotonic())
    with pytest.raises(UnknownKey):
        finish(lookup)
    with pytest.raises(UnknownKey):
        next(cache.lookup("another", clock))  # the cooldown started again


def test_a_lookup_waits_for_a_fetch_in_flight_even_inside_the_cooldown() -> None:
    clock, cache = FakeClock(), KeySetCache()
    owner = cache.lookup("k1", clock)
    assert next(owner) is Need.FETCH
    waiter = cache.lookup("k2", clock)
    assert next(waiter) is Need.WAIT
    cache.fetched({"k1": KEY, "k2": KEY}, 300, clock.monotonic())
    assert finish(waiter) is KEY


def test_stale_keys_serve_through_a_failure_until_the_stale_window_ends() -> None:
    clock, cache = FakeClock(), KeySetCache(stale_for=600, refetch_cooldown=30)
    warm = cache.lookup("k1", clock)
    next(warm)
    cache.fetched({"k1": KEY}, 300, clock.monotonic())
    finish(warm)
    clock.advance(300)
    lookup = cache.lookup("k1", clock)
    assert next(lookup) is Need.FETCH
    assert cache.failed(clock.monotonic()) is True
    assert finish(lookup, KeySetUnavailable("down")) is KEY
    clock.advance(10)  # inside the cooldown after a failure: served stale, no attempt
    with pytest.raises(StopIteration):
        next(cache.lookup("k1", clock))
    clock.advance(590)  # the stale window is over and the cooldown too: one more attempt
    lookup = cache.lookup("k1", clock)
    assert next(lookup) is Need.FETCH
    assert cache.failed(clock.monotonic()) is False
    failure = KeySetUnavailable("still down")
    with pytest.raises(KeySetUnavailable) as caught:
        lookup.send(failure)
    assert caught.value is failure
    with pytest.raises(KeySetUnavailable, match="no recent keys"):
        next(cache.lookup("k1", clock))  # and no attempt inside the cooldown


def test_an_abandoned_fetch_lets_the_next_caller_fetch() -> None:
    clock, cache = FakeClock(), KeySetCache()
    assert next(cache.lookup("k1", clock)) is Need.FETCH
    cache.abandoned()
    assert next(cache.lookup("k1", clock)) is Need.FETCH


def test_refresh_raises_the_failure_of_its_fetch() -> None:
    clock, cache = FakeClock(), KeySetCache()
    refresh = cache.refresh(clock)
    assert next(refresh) is Need.FETCH
    with pytest.raises(KeySetUnavailable):
        refresh.send(KeySetUnavailable("down"))


@pytest.mark.parametrize(
    ("header", "ttl"),
    [(None, 300.0), ("max-age=5", 60.0), ("max-age=600", 600.0), ("max-age=999999", 86_400.0)],
)
def test_the_ttl_is_max_age_within_the_bounds(header: str | None, ttl: float) -> None:
    assert KeySetCache().ttl_for(header) == ttl


@pytest.mark.parametrize(
    "options",
    [
        {"min_ttl": -1},
        {"refetch_cooldown": float("nan")},
        {"stale_for": -5},
        {"default_ttl": -1},
        {"min_ttl": 10, "max_ttl": 5},
    ],
)
def test_bad_options_are_refused(options: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        KeySetCache(**options)
