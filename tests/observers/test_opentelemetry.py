"""OpenTelemetryObserver: real blocks, the real SDK, read back with an InMemoryMetricReader."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from resilient import (
    CircuitBreaker,
    CircuitOpenError,
    ConfigurationError,
    MemoryBackend,
    RateLimiter,
    SlidingWindow,
    __version__,
)
from resilient._metrics import BREAKER_CALL_DURATION
from resilient.errors import BackendUnavailable
from resilient.events import BackendFailed, KeySetFetched
from resilient.opentelemetry import OpenTelemetryObserver
from resilient.testing import FakeClock
from tests.observers.conftest import OpenTelemetry


class Down(Exception):
    pass


def attrs(**values: str) -> frozenset[tuple[str, str]]:
    return frozenset(values.items())


async def test_denials_are_counted_by_policy(otel: OpenTelemetry) -> None:
    limiter = RateLimiter(MemoryBackend(), clock=FakeClock(), observer=otel.observer)
    for _ in range(4):
        await limiter.hit("user:42", SlidingWindow("1/minute"))
    points = otel.points()
    assert points["resilient.ratelimit.denied", attrs(policy="1/minute")] == 3
    assert otel.units()["resilient.ratelimit.denied"] == "{request}"


def test_the_breaker_state_gauge_follows_the_circuit(otel: OpenTelemetry) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(
        "payments",
        failure_rate=0.5,
        minimum_calls=1,
        window=1,
        open_for=10.0,
        half_open_calls=1,
        slow_call_duration=1.0,
        clock=clock,
        observer=otel.observer,
    )

    @breaker
    def charge(fail: bool) -> str:
        clock.advance(0.2)
        if fail:
            raise Down
        return "ok"

    def states() -> dict[str, object]:
        return {
            dict(attributes)["state"]: value
            for (name, attributes), value in otel.points().items()
            if name == "resilient.breaker.state"
        }

    with pytest.raises(Down):
        charge(True)
    assert states() == {"closed": 0, "open": 1, "half_open": 0, "forced_open": 0, "disabled": 0}
    with pytest.raises(CircuitOpenError):
        charge(False)
    clock.advance(10)
    assert charge(False) == "ok"
    assert states() == {"closed": 1, "open": 0, "half_open": 0, "forced_open": 0, "disabled": 0}
    points = otel.points()
    assert points["resilient.breaker.rejected", attrs(name="payments")] == 1
    assert (
        points[
            "resilient.breaker.transitions",
            attrs(name="payments", **{"from": "open", "to": "half_open"}),
        ]
        == 1
    )
    duration = points["resilient.breaker.call.duration", attrs(name="payments", outcome="error")]
    assert isinstance(duration, HistogramDataPoint)
    assert duration.count == 1
    assert duration.sum == pytest.approx(0.2)
    # The advised buckets reach the SDK: durations up to tens of seconds, not milliseconds.
    assert tuple(duration.explicit_bounds) == BREAKER_CALL_DURATION.buckets
    assert otel.units()["resilient.breaker.call.duration"] == "s"


def test_backend_errors_carry_the_semantic_error_type_attribute(otel: OpenTelemetry) -> None:
    error = BackendUnavailable("down", retry_after=1.0)
    otel.observer(BackendFailed("cache", "get", error, "loaded directly"))
    [attributes] = [key[1] for key in otel.points() if key[0] == "resilient.backend.errors"]
    assert dict(attributes) == {
        "block": "cache",
        "operation": "get",
        "outcome": "loaded directly",
        "error.type": "resilient.errors.BackendUnavailable",
    }


def test_a_gauge_keeps_the_last_value_of_each_attribute_set(otel: OpenTelemetry) -> None:
    otel.observer(KeySetFetched("jwks", "https://a.example/jwks", 3, 300.0))
    otel.observer(KeySetFetched("jwks", "https://b.example/jwks", 1, 300.0))
    otel.observer(KeySetFetched("jwks", "https://a.example/jwks", 2, 300.0))
    points = otel.points()
    assert points["resilient.jwks.keys", attrs(url="https://a.example/jwks")] == 2
    assert points["resilient.jwks.keys", attrs(url="https://b.example/jwks")] == 1
    assert points["resilient.jwks.fetches", attrs(url="https://a.example/jwks")] == 2


def test_instruments_live_in_the_resilient_scope_with_the_package_version(
    otel: OpenTelemetry,
) -> None:
    otel.observer(KeySetFetched("jwks", "https://a.example/jwks", 3, 300.0))
    data = otel.reader.get_metrics_data()
    assert data is not None
    [scope] = [s.scope for r in data.resource_metrics for s in r.scope_metrics]
    assert (scope.name, scope.version) == ("resilient", __version__)


def test_a_meter_of_ones_own_and_a_namespace() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        observer = OpenTelemetryObserver(meter=provider.get_meter("shop"), namespace="shop")
        observer(KeySetFetched("jwks", "https://a.example/jwks", 3, 300.0))
        data = reader.get_metrics_data()
        assert data is not None
        [scope] = [s for r in data.resource_metrics for s in r.scope_metrics]
        assert scope.scope.name == "shop"
        assert {m.name for m in scope.metrics} == {"shop.jwks.fetches", "shop.jwks.keys"}
        assert repr(observer) == "OpenTelemetryObserver(namespace='shop')"
    finally:
        provider.shutdown()


def test_a_meter_and_a_meter_provider_together_are_refused() -> None:
    provider = MeterProvider()
    try:
        with pytest.raises(ConfigurationError, match="not both"):
            OpenTelemetryObserver(meter=provider.get_meter("x"), meter_provider=provider)
        with pytest.raises(ConfigurationError, match="namespace"):
            OpenTelemetryObserver(meter_provider=provider, namespace="a.b")
    finally:
        provider.shutdown()
