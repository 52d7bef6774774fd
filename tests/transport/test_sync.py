"""``SyncResilientTransport``: the same essentials as the async one, for ``httpx.Client``."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from resilient import CircuitBreaker, CircuitOpenError, ConfigurationError, SyncResilientTransport
from resilient import retry as make_retry
from resilient.breaker import State
from resilient.testing import FakeClock
from tests.retry.conftest import Sleeper
from tests.transport.conftest import Script, SyncCountingTransport, Upstream


def resilient(inner: httpx.BaseTransport, **options: Any) -> SyncResilientTransport:
    return SyncResilientTransport(inner, **options)


def breaker(clock: FakeClock, **options: Any) -> CircuitBreaker:
    settings: dict[str, Any] = {"failure_rate": 0.5, "minimum_calls": 4, "window": 4}
    return CircuitBreaker("upstream", clock=clock, observer=None, **(settings | options))


def test_a_get_is_retried_after_a_503_and_gets_the_200(
    upstream: Upstream, base_url: str, sleeper: Sleeper
) -> None:
    upstream.statuses = [503, 200]
    transport = resilient(httpx.HTTPTransport(), retry=make_retry(sleep=sleeper))
    with httpx.Client(transport=transport, base_url=base_url) as http:
        response = http.get("/scripted")
    assert response.status_code == 200
    assert upstream.hits["/scripted"] == 2


def test_a_post_is_retried_only_with_an_idempotency_key(
    upstream: Upstream, base_url: str, sleeper: Sleeper
) -> None:
    upstream.statuses = [503, 503, 200]
    transport = resilient(httpx.HTTPTransport(), retry=make_retry(sleep=sleeper))
    with httpx.Client(transport=transport, base_url=base_url) as http:
        plain = http.post("/scripted", content=b"order")
        keyed = http.post("/scripted", content=b"order", headers={"Idempotency-Key": '"k"'})
    assert (plain.status_code, keyed.status_code) == (503, 200)
    assert upstream.hits["/scripted"] == 3


def test_retried_responses_are_closed(upstream: Upstream, base_url: str, sleeper: Sleeper) -> None:
    upstream.statuses = [503, 502, 200]
    pool = httpx.HTTPTransport(limits=httpx.Limits(max_connections=1))
    counting = SyncCountingTransport(pool)
    transport = resilient(counting, retry=make_retry(sleep=sleeper))
    timeout = httpx.Timeout(10.0, pool=2.0)
    with httpx.Client(transport=transport, base_url=base_url, timeout=timeout) as http:
        response = http.get("/scripted")
        assert response.status_code == 200
        assert (counting.opened, counting.closed) == (3, 3)


def test_a_closed_port_raises_connect_error(closed_port_url: str, sleeper: Sleeper) -> None:
    guard = breaker(FakeClock(), minimum_calls=10, window=10)
    transport = resilient(httpx.HTTPTransport(), breaker=guard, retry=make_retry(sleep=sleeper))
    with (
        httpx.Client(transport=transport, base_url=closed_port_url) as http,
        pytest.raises(httpx.ConnectError),
    ):
        http.get("/")
    assert guard.metrics()["failures"] == 3
    assert len(sleeper.waits) == 2


def test_the_breaker_opens_then_rejects_without_touching_the_network(
    upstream: Upstream, base_url: str, clock: FakeClock
) -> None:
    guard = breaker(clock)
    transport = resilient(httpx.HTTPTransport(), breaker=guard, retry=None)
    with httpx.Client(transport=transport, base_url=base_url) as http:
        statuses = [http.get("/status/503").status_code for _ in range(4)]
        with pytest.raises(CircuitOpenError):
            http.get("/status/503")
        clock.advance(30.0)
        probe = http.get("/status/200")
    assert statuses == [503] * 4
    assert upstream.hits["/status/503"] == 4
    assert probe.status_code == 200
    assert guard.state is State.CLOSED


def test_the_attempt_timeout_bounds_each_read(
    upstream: Upstream, base_url: str, sleeper: Sleeper
) -> None:
    guard = breaker(FakeClock(), minimum_calls=10, window=10)
    transport = resilient(
        httpx.HTTPTransport(),
        breaker=guard,
        retry=make_retry(attempts=2, sleep=sleeper),
        timeout=0.2,
    )
    with (
        httpx.Client(transport=transport, base_url=base_url, timeout=30.0) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.get("/stall")
    assert guard.metrics()["failures"] == 2
    assert len(sleeper.waits) == 1


def test_a_shorter_client_timeout_is_kept(upstream: Upstream, base_url: str) -> None:
    transport = resilient(httpx.HTTPTransport(), retry=None, timeout=30.0)
    with httpx.Client(transport=transport, base_url=base_url, timeout=0.2) as http:
        request = http.build_request("GET", "/stall")
        with pytest.raises(httpx.ReadTimeout):
            http.send(request)
    assert request.extensions["timeout"] == {"connect": 0.2, "read": 0.2, "write": 0.2, "pool": 0.2}


def test_retry_after_is_honoured(clock: FakeClock, sleeper: Sleeper) -> None:
    script = Script((429, {"Retry-After": "3"}), 200)
    policy = make_retry(clock=clock, sleep=sleeper, cap=0.5)
    with httpx.Client(transport=resilient(httpx.MockTransport(script), retry=policy)) as http:
        response = http.get("http://api.test/")
    assert response.status_code == 200
    assert sleeper.waits == [3.0]


def test_an_async_sleep_is_refused_up_front(clock: FakeClock) -> None:
    with pytest.raises(ConfigurationError, match="sleep must be too"):
        SyncResilientTransport(retry=make_retry(sleep=clock.sleep))


def test_closing_the_transport_closes_the_wrapped_one() -> None:
    class Closable(httpx.MockTransport):
        closed = False

        def close(self) -> None:
            self.closed = True

    inner = Closable(Script())
    with SyncResilientTransport(inner) as transport:
        assert transport.transport is inner
    assert inner.closed
