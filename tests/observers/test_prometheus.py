"""PrometheusObserver: real blocks emit real events into a real registry's exposition."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis.asyncio
from prometheus_client import CollectorRegistry, generate_latest

from resilient import (
    Cache,
    CircuitBreaker,
    CircuitOpenError,
    ConfigurationError,
    IdempotencyMiddleware,
    MemoryBackend,
    RateLimiter,
    RedisBackend,
    SlidingWindow,
    retry,
)
from resilient.auth import JWKSClient, JWTValidator
from resilient.errors import BadAudience, KeySetUnavailable
from resilient.events import LoggingObserver, RateLimited, observe_all
from resilient.prometheus import PrometheusObserver
from resilient.testing import FakeClock, LocalIssuer, RedisServer, retries_without_waits
from tests.idempotency.conftest import Shop, client_for
from tests.observers.conftest import Prometheus

KEY = {"Idempotency-Key": "5d1f0b8e-6a43-4c57-9b3e-2f6c1d7a9e10"}


class Down(Exception):
    pass


async def test_denials_are_counted_by_policy_and_never_by_key(prometheus: Prometheus) -> None:
    limiter = RateLimiter(MemoryBackend(), clock=FakeClock(), observer=prometheus.observer)
    login = SlidingWindow("2/minute", name="login")
    for _ in range(5):
        await limiter.hit("ip:203.0.113.7", login)
    await limiter.hit("ip:198.51.100.1", login)
    assert prometheus.value("resilient_ratelimit_denied_total", policy="login") == 3
    assert "203.0.113.7" not in generate_latest(prometheus.registry).decode()


@pytest.mark.redis
async def test_a_backend_outage_is_counted_with_what_the_block_did(
    fresh_redis_server: RedisServer, prometheus: Prometheus
) -> None:
    client = redis.asyncio.Redis.from_url(fresh_redis_server.url)
    backend = RedisBackend(client)
    limiter = RateLimiter(backend, observer=prometheus.observer)
    try:
        fresh_redis_server.stop()
        assert (await limiter.hit("k", SlidingWindow("1/hour"))).allowed
    finally:
        await backend.aclose()
        await client.aclose()
    [(labels, value)] = [
        (dict(labels), value)
        for (name, labels), value in prometheus.samples().items()
        if name == "resilient_backend_errors_total"
    ]
    assert value == 1
    assert labels["block"] == "ratelimit"
    assert labels["operation"] == "check"
    assert labels["outcome"] == "admitted"
    assert labels["error_type"].startswith("resilient.errors.")


def test_a_breaker_driven_open_and_closed_again_shows_in_transitions_and_state(
    prometheus: Prometheus,
) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(
        "payments",
        failure_rate=0.5,
        minimum_calls=2,
        window=2,
        open_for=30.0,
        half_open_calls=1,
        slow_call_duration=2.0,
        clock=clock,
        observer=prometheus.observer,
    )

    @breaker
    def charge(fail: bool, seconds: float = 0.0) -> str:
        clock.advance(seconds)
        if fail:
            raise Down
        return "ok"

    def state(name: str) -> float | None:
        return prometheus.value("resilient_breaker_state", name="payments", state=name)

    with pytest.raises(Down):
        charge(True, seconds=0.5)
    with pytest.raises(Down):
        charge(True, seconds=3.0)  # failed and slow: 2 of 2 failed, open
    assert state("open") == 1
    assert state("closed") == state("half_open") == 0
    with pytest.raises(CircuitOpenError):
        charge(False)
    assert prometheus.value("resilient_breaker_rejected_total", name="payments") == 1
    clock.advance(30)
    assert charge(False) == "ok"  # the probe: half-open, then closed
    assert state("closed") == 1
    assert state("open") == state("half_open") == 0
    transitions = {
        (labels["from"], labels["to"]): value
        for (name, raw), value in prometheus.samples().items()
        if name == "resilient_breaker_transitions_total"
        for labels in [dict(raw)]
    }
    assert transitions == {
        ("closed", "open"): 1,
        ("open", "half_open"): 1,
        ("half_open", "closed"): 1,
    }
    calls = {"name": "payments", "outcome": "error"}
    assert prometheus.value("resilient_breaker_calls_total", **calls) == 2
    assert prometheus.value("resilient_breaker_call_duration_seconds_count", **calls) == 2
    assert prometheus.value("resilient_breaker_call_duration_seconds_sum", **calls) == 3.5
    assert (
        prometheus.value("resilient_breaker_call_duration_seconds_bucket", le="1.0", **calls) == 1
    )


def test_retries_and_the_give_up_are_counted_by_name_and_cause(prometheus: Prometheus) -> None:
    @retry(attempts=3, on=Down, name="inventory", observer=prometheus.observer)
    def reserve() -> None:
        raise Down

    with retries_without_waits(), pytest.raises(Down):
        reserve()
    cause = f"{Down.__module__}.Down"
    assert (
        prometheus.value("resilient_retry_scheduled_total", name="inventory", error_type=cause) == 2
    )
    assert prometheus.value("resilient_retry_wait_seconds_count", name="inventory") == 2
    assert (
        prometheus.value("resilient_retry_gave_up_total", name="inventory", reason="attempts") == 1
    )


async def test_cache_lookups_add_up_to_every_read(prometheus: Prometheus) -> None:
    clock = FakeClock()
    cache = Cache(
        MemoryBackend(),
        ttl=10,
        stale_while_revalidate=60,
        jitter=0,
        beta=0,
        clock=clock,
        observer=prometheus.observer,
    )
    loads = 0

    async def load() -> dict[str, int]:
        nonlocal loads
        loads += 1
        return {"price": 42}

    try:
        await cache.get_or_load("product:42", load)  # miss
        await cache.get_or_load("product:42", load)  # hit
        clock.advance(15)
        await cache.get_or_load("product:42", load)  # stale, refreshed in the background
        await asyncio.sleep(0.01)
    finally:
        await cache.aclose()
    lookups = "resilient_cache_lookups_total"
    assert prometheus.value(lookups, result="miss") == 1
    assert prometheus.value(lookups, result="hit") == 1
    assert prometheus.value(lookups, result="stale") == 1
    assert prometheus.value("resilient_cache_stale_served_total", reason="revalidating") == 1
    assert prometheus.value("resilient_cache_refreshes_total", reason="stale") == 1
    assert loads == 2
    assert "product:42" not in generate_latest(prometheus.registry).decode()


async def test_idempotency_outcomes_are_counted(prometheus: Prometheus) -> None:
    shop = Shop()
    app = IdempotencyMiddleware(shop.app, backend=MemoryBackend(), observer=prometheus.observer)
    async with client_for(app) as client:
        first = await client.post("/api/orders", json={"sku": "A1"}, headers=KEY)
        again = await client.post("/api/orders", json={"sku": "A1"}, headers=KEY)
        other = await client.post("/api/orders", json={"sku": "B2"}, headers=KEY)
    assert (first.status_code, again.status_code, other.status_code) == (201, 201, 422)
    duplicates = "resilient_idempotency_duplicates_total"
    assert prometheus.value(duplicates, block="idempotency", outcome="replayed") == 1
    assert prometheus.value(duplicates, block="idempotency", outcome="mismatch") == 1
    assert KEY["Idempotency-Key"] not in generate_latest(prometheus.registry).decode()


async def test_key_set_fetches_failures_and_refused_tokens_are_counted(
    prometheus: Prometheus,
) -> None:
    clock = FakeClock()
    with LocalIssuer(clock=clock) as issuer:
        jwks = JWKSClient(issuer.jwks_url, stale_for=600, clock=clock, observer=prometheus.observer)
        validator = JWTValidator(
            jwks,
            issuer=issuer.issuer,
            audience="api",
            clock=clock,
            observer=prometheus.observer,
        )
        await validator.validate(issuer.mint())
        issuer.fail(503)
        clock.advance(300)
        await validator.validate(issuer.mint())  # the old keys serve, stale
        clock.advance(600)
        with pytest.raises(KeySetUnavailable):
            await validator.validate(issuer.mint())
        issuer.recover()
        clock.advance(30)
        with pytest.raises(BadAudience):
            await validator.validate(issuer.mint({"aud": "other"}))
        url = issuer.jwks_url
    assert prometheus.value("resilient_jwks_fetches_total", url=url) == 2
    assert prometheus.value("resilient_jwks_keys", url=url) == 3
    failures = {
        dict(labels)["outcome"]: value
        for (name, labels), value in prometheus.samples().items()
        if name == "resilient_jwks_fetch_failures_total"
    }
    assert failures == {"stale": 1, "unavailable": 1}
    assert prometheus.value("resilient_jwt_rejected_total", reason="BadAudience") == 1


def test_observe_all_logs_and_counts_the_same_event(
    prometheus: Prometheus, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    observer = observe_all(LoggingObserver(), prometheus.observer)
    breaker = CircuitBreaker(
        "search", failure_rate=0.5, minimum_calls=1, window=1, clock=clock, observer=observer
    )
    with caplog.at_level(logging.WARNING, logger="resilient"), pytest.raises(Down):
        breaker.call(_fail)
    assert "BreakerStateChanged" in caplog.text
    assert "'search'" in caplog.text
    assert prometheus.value("resilient_breaker_state", name="search", state="open") == 1


def _fail() -> None:
    raise Down


def test_the_exposition_follows_the_naming_conventions(prometheus: Prometheus) -> None:
    text = generate_latest(prometheus.registry).decode()
    types = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE "))
    for name, kind in types.items():
        assert name.startswith("resilient_"), name
        if kind == "counter":
            assert name.endswith("_total"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name
    assert types["resilient_breaker_state"] == "gauge"
    assert types["resilient_breaker_call_duration_seconds"] == "histogram"


def test_a_namespace_of_ones_own() -> None:
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry=registry, namespace="shop")
    observer(_denied())
    assert registry.get_sample_value("shop_ratelimit_denied_total", {"policy": "5/minute"}) == 1
    assert repr(observer) == "PrometheusObserver(namespace='shop')"


def _denied() -> RateLimited:
    return RateLimited("ratelimit", "user:1", "5/minute", 12.0)


def test_a_second_observer_on_one_registry_is_refused_and_the_first_keeps_working() -> None:
    registry = CollectorRegistry()
    first = PrometheusObserver(registry=registry)
    with pytest.raises(ConfigurationError, match="one PrometheusObserver per registry"):
        PrometheusObserver(registry=registry)
    PrometheusObserver(registry=registry, namespace="other")  # another namespace is fine
    first(_denied())
    assert (
        registry.get_sample_value("resilient_ratelimit_denied_total", {"policy": "5/minute"}) == 1
    )


@pytest.mark.parametrize("namespace", ["", "1st", "my-service", "a.b", "with space", None])
def test_a_namespace_that_is_no_metric_name_is_refused(namespace: object) -> None:
    with pytest.raises(ConfigurationError, match="namespace must start with a letter"):
        PrometheusObserver(registry=CollectorRegistry(), namespace=namespace)  # type: ignore[arg-type]


def test_a_registry_must_be_a_collector_registry() -> None:
    with pytest.raises(ConfigurationError, match="CollectorRegistry"):
        PrometheusObserver(registry=object())  # type: ignore[arg-type]


def test_observe_all_still_counts_when_an_observer_before_it_raises(
    prometheus: Prometheus, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: object) -> None:
        raise RuntimeError("exporter down")

    observer = observe_all(broken, prometheus.observer)
    observer(_denied())
    assert prometheus.value("resilient_ratelimit_denied_total", policy="5/minute") == 1
    assert "exporter down" in caplog.text
