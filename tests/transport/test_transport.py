"""Both transports, one set of behaviours: retry -> breaker -> timeout -> call.

Each test runs twice, through ``ResilientTransport`` and an ``httpx.AsyncClient``, and
through ``SyncResilientTransport`` and an ``httpx.Client`` (the ``via`` fixture).
"""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest

from resilient import BreakerRegistry, CircuitBreaker, CircuitOpenError, retry
from resilient.breaker import State
from resilient.events import CallFailed, RetryGaveUp, RetryScheduled
from resilient.retries import Retry
from resilient.testing import FakeClock, RecordingObserver
from tests.retry.conftest import Sleeper
from tests.transport.conftest import Counting, Script, Upstream, Via


def quick_retry(sleeper: Sleeper, **options: Any) -> Retry:
    """A retry policy whose waits go to *sleeper* (and its fake clock)."""
    return retry(sleep=sleeper, clock=sleeper.clock, **options)


def breaker(clock: FakeClock, name: str = "upstream", **options: Any) -> CircuitBreaker:
    settings: dict[str, Any] = {"failure_rate": 0.5, "minimum_calls": 4, "window": 4}
    return CircuitBreaker(name, clock=clock, observer=None, **(settings | options))


# --- over real TCP, against a uvicorn server ---------------------------------------------


async def test_a_get_is_retried_after_a_503_and_gets_the_200(
    via: Via, upstream: Upstream, base_url: str, sleeper: Sleeper
) -> None:
    upstream.statuses = [503, 200]
    transport = via.resilient(via.network(), retry=quick_retry(sleeper))
    async with via.client(transport, base_url) as http:
        response = await http.get("/scripted")
    assert response.status_code == 200
    assert upstream.hits["/scripted"] == 2
    assert len(sleeper.waits) == 1


async def test_a_post_is_not_retried(
    via: Via, upstream: Upstream, base_url: str, sleeper: Sleeper
) -> None:
    upstream.statuses = [503, 200]
    transport = via.resilient(via.network(), retry=quick_retry(sleeper))
    async with via.client(transport, base_url) as http:
        response = await http.post("/scripted", content=b"order")
    assert response.status_code == 503
    assert upstream.hits["/scripted"] == 1
    assert sleeper.waits == []


async def test_a_post_with_an_idempotency_key_is_retried_with_its_body(
    via: Via, upstream: Upstream, base_url: str, sleeper: Sleeper
) -> None:
    upstream.statuses = [502, 504, 201]
    transport = via.resilient(via.network(), retry=quick_retry(sleeper))
    async with via.client(transport, base_url) as http:
        response = await http.post(
            "/scripted", json={"sku": "A1"}, headers={"Idempotency-Key": '"order-1"'}
        )
    assert response.status_code == 201
    assert upstream.hits["/scripted"] == 3
    assert upstream.bodies == [b'{"sku":"A1"}'] * 3


async def test_a_post_is_retried_only_with_an_idempotency_key(
    via: Via, upstream: Upstream, base_url: str, sleeper: Sleeper
) -> None:
    upstream.statuses = [503, 503, 200]
    transport = via.resilient(via.network(), retry=quick_retry(sleeper))
    async with via.client(transport, base_url) as http:
        plain = await http.post("/scripted", content=b"order")
        keyed = await http.post("/scripted", content=b"order", headers={"Idempotency-Key": '"k"'})
    assert (plain.status_code, keyed.status_code) == (503, 200)
    assert upstream.hits["/scripted"] == 3


async def test_a_closed_port_raises_connect_error_once_attempts_run_out(
    via: Via, closed_port_url: str, clock: FakeClock, sleeper: Sleeper
) -> None:
    guard = breaker(clock, minimum_calls=10, window=10)
    transport = via.resilient(via.network(), breaker=guard, retry=quick_retry(sleeper, attempts=3))
    async with via.client(transport, closed_port_url) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get("/anything")
    assert len(sleeper.waits) == 2
    assert guard.metrics()["failures"] == 3  # the breaker saw every attempt


async def test_the_breaker_opens_then_rejects_without_touching_the_network(
    via: Via, upstream: Upstream, base_url: str, clock: FakeClock
) -> None:
    guard = breaker(clock, open_for=30.0)
    transport = via.resilient(via.network(), breaker=guard, retry=None)
    async with via.client(transport, base_url) as http:
        statuses = [(await http.get("/status/500")).status_code for _ in range(4)]
        with pytest.raises(CircuitOpenError) as rejected:
            await http.get("/status/500")
        opened = guard.state
        clock.advance(30.0)
        probe = await http.get("/status/200")
    assert statuses == [500] * 4
    assert upstream.hits["/status/500"] == 4
    assert opened is State.OPEN
    assert rejected.value.breaker == "upstream"
    assert rejected.value.retry_after == 30.0
    assert probe.status_code == 200
    assert guard.state is State.CLOSED


async def test_retried_responses_are_closed_so_one_connection_serves_every_attempt(
    via: Via, upstream: Upstream, base_url: str, sleeper: Sleeper
) -> None:
    upstream.statuses = [503, 503, 200]
    # One connection in the pool: an attempt that left the last response open would wait
    # for the pool and fail with PoolTimeout.
    counting = Counting(via.network(limits=httpx.Limits(max_connections=1)))
    transport = via.resilient(counting, retry=quick_retry(sleeper, attempts=3))
    timeout = httpx.Timeout(10.0, pool=2.0)
    async with via.client(transport, base_url, timeout=timeout) as http:
        response = await http.get("/scripted")
        assert response.status_code == 200
        assert (counting.opened, counting.closed) == (3, 3)  # the client read and closed the last
        assert response.content == b"answer " * 100


async def test_an_attempt_that_outlives_its_timeout_fails_and_is_retried(
    via: Via, upstream: Upstream, base_url: str, clock: FakeClock, sleeper: Sleeper
) -> None:
    guard = breaker(clock, minimum_calls=10, window=10)
    transport = via.resilient(
        via.network(), breaker=guard, retry=quick_retry(sleeper, attempts=2), timeout=0.2
    )
    async with via.client(transport, base_url, timeout=30.0) as http:
        with pytest.raises(httpx.TimeoutException) as raised:
            await http.get("/stall")
    assert guard.metrics()["failures"] == 2
    assert len(sleeper.waits) == 1
    if via.is_async:  # the attempt as a whole is bounded
        assert "within 0.2s" in str(raised.value)
    else:  # each network operation is: here the read of the response
        assert isinstance(raised.value, httpx.ReadTimeout)


async def test_the_sync_timeout_keeps_a_shorter_client_timeout(
    upstream: Upstream, base_url: str
) -> None:
    via = Via(is_async=False)
    transport = via.resilient(via.network(), retry=None, timeout=30.0)
    async with via.client(transport, base_url, timeout=0.2) as http:
        request = http.build_request("GET", "/stall")
        with pytest.raises(httpx.ReadTimeout):
            await http.send(request)
    assert request.extensions["timeout"] == {"connect": 0.2, "read": 0.2, "write": 0.2, "pool": 0.2}


# --- deterministic answers through httpx.MockTransport -------------------------------------


@pytest.mark.parametrize(("status", "seconds"), [(503, 7.0), (429, 3.0)])
async def test_retry_after_is_honoured(
    via: Via, sleeper: Sleeper, status: int, seconds: float
) -> None:
    script = Script((status, {"Retry-After": f"{seconds:g}"}), 200)
    transport = via.resilient(httpx.MockTransport(script), retry=quick_retry(sleeper, cap=0.5))
    async with via.client(transport) as http:
        response = await http.get("/prices")
    assert response.status_code == 200
    assert sleeper.waits == [seconds]


async def test_a_retry_after_beyond_the_deadline_returns_the_response_at_once(
    via: Via, sleeper: Sleeper, recorder: RecordingObserver
) -> None:
    script = Script((503, {"Retry-After": "120"}), 200)
    policy = quick_retry(sleeper, deadline=10.0, observer=recorder)
    transport = via.resilient(httpx.MockTransport(script), retry=policy)
    async with via.client(transport) as http:
        response = await http.get("/prices")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "120"
    assert script.hits() == 1
    assert sleeper.waits == []
    assert [e.reason for e in recorder.of(RetryGaveUp)] == ["deadline"]


async def test_an_open_circuit_within_the_deadline_is_waited_for(
    via: Via, clock: FakeClock, sleeper: Sleeper, recorder: RecordingObserver
) -> None:
    guard = breaker(clock, minimum_calls=2, window=2, open_for=5.0)
    script = Script(503, 503, 200)
    policy = quick_retry(sleeper, attempts=4, deadline=30.0, cap=0.1, observer=recorder)
    transport = via.resilient(httpx.MockTransport(script), breaker=guard, retry=policy)
    async with via.client(transport) as http:
        response = await http.get("/prices")
    assert response.status_code == 200
    assert script.hits() == 3  # two failures opened it; the rejection never reached the host
    causes = [e.cause for e in recorder.of(RetryScheduled)]
    assert isinstance(causes[2], CircuitOpenError)
    assert sleeper.waits[2] == causes[2].retry_after  # waited exactly until half-open
    assert guard.state is State.CLOSED  # the probe succeeded


async def test_an_open_circuit_beyond_the_deadline_gives_up_at_once(
    via: Via, clock: FakeClock, sleeper: Sleeper, recorder: RecordingObserver
) -> None:
    guard = breaker(clock, minimum_calls=2, window=2, open_for=60.0)
    script = Script(503, 503, 200)
    policy = quick_retry(sleeper, attempts=4, deadline=10.0, cap=0.1, observer=recorder)
    transport = via.resilient(httpx.MockTransport(script), breaker=guard, retry=policy)
    async with via.client(transport) as http:
        with pytest.raises(CircuitOpenError):
            await http.get("/prices")
    assert script.hits() == 2
    assert len(sleeper.waits) == 2  # after each 503; none after the rejection
    gave_up = recorder.of(RetryGaveUp)
    assert [e.reason for e in gave_up] == ["deadline"]


async def test_each_host_has_its_own_breaker(via: Via, clock: FakeClock) -> None:
    script = Script(*[500] * 4)
    breakers = BreakerRegistry(lambda origin: breaker(clock, origin))
    transport = via.resilient(httpx.MockTransport(script), breaker=breakers, retry=None)
    async with via.client(transport) as http:
        for _ in range(4):
            await http.get("https://a.test/")
        with pytest.raises(CircuitOpenError) as rejected:
            await http.get("https://a.test/")
        healthy = await http.get("https://b.test:8443/")
    assert healthy.status_code == 200
    assert rejected.value.breaker == "https://a.test:443"
    assert {b.name: b.state for b in breakers} == {
        "https://a.test:443": State.OPEN,
        "https://b.test:8443": State.CLOSED,
    }
    assert (script.hits("a.test"), script.hits("b.test")) == (4, 1)


async def test_the_default_breakers_are_one_per_origin_and_made_once(via: Via) -> None:
    made: list[str] = []

    def factory(origin: str) -> CircuitBreaker:
        made.append(origin)
        return CircuitBreaker(origin, observer=None)

    transport = via.resilient(httpx.MockTransport(Script()), breaker=factory)
    async with via.client(transport) as http:
        for url in [
            "http://a.test/1",
            "http://a.test:80/2",
            "http://[::1]:8000/",
            "http://a.test/",
        ]:
            await http.get(url)
    assert made == ["http://a.test:80", "http://[::1]:8000"]


async def test_a_half_open_probe_that_succeeds_closes_the_circuit(
    via: Via, clock: FakeClock
) -> None:
    guard = breaker(clock, open_for=30.0)
    script = Script(*[503] * 4)
    transport = via.resilient(httpx.MockTransport(script), breaker=guard, retry=None)
    async with via.client(transport) as http:
        for _ in range(4):
            await http.get("/")
        assert guard.state.value == "open"
        clock.advance(30.0)
        assert guard.state.value == "half_open"
        probe = await http.get("/")
    assert probe.status_code == 200
    assert guard.state is State.CLOSED
    assert script.hits() == 5


async def test_client_errors_do_not_count_against_the_host(via: Via, clock: FakeClock) -> None:
    guard = breaker(clock)
    script = Script(*[404] * 4, 400)
    transport = via.resilient(httpx.MockTransport(script), breaker=guard, retry=None)
    async with via.client(transport) as http:
        statuses = [(await http.get("/")).status_code for _ in range(5)]
    assert statuses == [404, 404, 404, 404, 400]
    assert guard.state is State.CLOSED
    assert guard.metrics()["failures"] == 0


async def test_a_breaker_that_does_not_record_status_errors_ignores_5xx(
    via: Via, clock: FakeClock
) -> None:
    recorder = RecordingObserver()
    only_transport_errors = CircuitBreaker(
        "upstream", minimum_calls=2, window=2, record=httpx.TransportError, clock=clock
    )
    status_errors_too = CircuitBreaker(
        "upstream",
        minimum_calls=2,
        window=2,
        record=(httpx.TransportError, httpx.HTTPStatusError),
        clock=clock,
        observer=recorder,
    )
    for guard in (only_transport_errors, status_errors_too):
        transport = via.resilient(httpx.MockTransport(Script(503, 503)), breaker=guard, retry=None)
        async with via.client(transport) as http:
            await http.get("/")
            await http.get("/")
    assert only_transport_errors.state is State.CLOSED
    assert status_errors_too.state is State.OPEN
    failed = recorder.of(CallFailed)[0]
    assert isinstance(failed.error, httpx.HTTPStatusError)
    assert failed.error.response.status_code == 503


async def test_a_streaming_body_is_sent_once(via: Via, sleeper: Sleeper) -> None:
    script = Script(503, 200)
    transport = via.resilient(httpx.MockTransport(script), retry=quick_retry(sleeper))
    async with via.client(transport) as http:
        response = await http.put("/upload", content=via.body(b"part 1, ", b"part 2"))
    assert response.status_code == 503
    assert script.hits() == 1
    assert script.requests[0].content == b"part 1, part 2"


async def test_a_body_read_into_memory_is_retried(via: Via, sleeper: Sleeper) -> None:
    script = Script(503, 200)
    transport = via.resilient(httpx.MockTransport(script), retry=quick_retry(sleeper))
    async with via.client(transport) as http:
        request = http.build_request("PUT", "/upload", content=via.body(b"part 1, ", b"part 2"))
        await via.read(request)
        response = await http.send(request)
    assert response.status_code == 200
    assert [r.content for r in script.requests] == [b"part 1, part 2"] * 2


async def test_a_body_given_as_a_byte_stream_is_retried(via: Via, sleeper: Sleeper) -> None:
    script = Script(503, 200)
    transport = via.resilient(httpx.MockTransport(script), retry=quick_retry(sleeper))
    request = httpx.Request("PUT", "http://api.test/", stream=httpx.ByteStream(b"whole"))
    async with via.client(transport) as http:
        response = await http.send(request)
    assert response.status_code == 200
    assert [r.content for r in script.requests] == [b"whole"] * 2


async def test_errors_that_another_attempt_would_repeat_are_not_retried(
    via: Via, sleeper: Sleeper
) -> None:
    script = Script(httpx.LocalProtocolError("bad header"), 200)
    transport = via.resilient(httpx.MockTransport(script), retry=quick_retry(sleeper))
    async with via.client(transport) as http:
        with pytest.raises(httpx.LocalProtocolError):
            await http.get("/")
    assert script.hits() == 1


async def test_the_policys_own_on_narrows_what_is_retried(via: Via, sleeper: Sleeper) -> None:
    script = Script(httpx.ReadTimeout("slow"), httpx.ConnectError("refused"), 200)
    policy = quick_retry(sleeper, attempts=5, on=httpx.ConnectError)
    transport = via.resilient(httpx.MockTransport(script), retry=policy)
    async with via.client(transport) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get("/")
    assert script.hits() == 1


async def test_retry_statuses_are_configurable(via: Via, sleeper: Sleeper) -> None:
    script = Script(500, 503, 200)
    transport = via.resilient(
        httpx.MockTransport(script), retry=quick_retry(sleeper), retry_statuses={500}
    )
    async with via.client(transport) as http:
        response = await http.get("/")
    assert response.status_code == 503
    assert script.hits() == 2


async def test_without_retry_or_breaker_a_request_is_sent_once_as_it_is(via: Via) -> None:
    script = Script(*[503] * 30)
    transport = via.resilient(httpx.MockTransport(script), retry=None, breaker=False)
    async with via.client(transport) as http:
        statuses = {(await http.get("/")).status_code for _ in range(30)}
    assert statuses == {503}
    assert script.hits() == 30


async def test_the_defaults_retry_a_get_after_a_connection_error(via: Via) -> None:
    script = Script(httpx.ConnectError("refused"), 200)
    transport = via.resilient(httpx.MockTransport(script))
    async with via.client(transport) as http:
        response = await http.get("/")
    assert response.status_code == 200
    assert script.hits() == 2


async def test_interrupted_while_waiting_to_retry_closes_the_response(via: Via) -> None:
    counting = Counting(httpx.MockTransport(Script(503, 200)))
    transport = via.resilient(counting, retry=retry(sleep=via.interrupting_sleep()))
    async with via.client(transport) as http:
        with pytest.raises(via.interruption):
            await http.get("/")
    assert (counting.opened, counting.closed) == (1, 1)


async def test_the_retry_events_name_the_transport(
    via: Via, sleeper: Sleeper, recorder: RecordingObserver
) -> None:
    policy = quick_retry(sleeper, observer=recorder, rng=random.Random(1))
    transport = via.resilient(httpx.MockTransport(Script(503, 200)), retry=policy)
    async with via.client(transport) as http:
        await http.get("/")
    scheduled = recorder.of(RetryScheduled)
    assert [(e.name, e.cause.status_code) for e in scheduled] == [  # type: ignore[attr-defined]
        ("resilient.httpx", 503)
    ]


async def test_closing_the_transport_closes_the_wrapped_one(via: Via) -> None:
    class Closable(httpx.MockTransport):
        closed = False

        def close(self) -> None:
            self.closed = True

        async def aclose(self) -> None:
            self.closed = True

    inner = Closable(Script())
    transport = via.resilient(inner)
    assert transport.transport is inner
    async with via.client(transport) as http:
        await http.get("/")
        assert not inner.closed
    assert inner.closed
