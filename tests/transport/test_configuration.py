"""Bad options fail at construction; origins name the default breakers."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from resilient import ConfigurationError, ResilientTransport, SyncResilientTransport
from resilient import retry as make_retry
from resilient.httpx import is_failure, origin_of
from resilient.testing import FakeClock


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"timeout": 0}, "timeout must be a finite number of seconds"),
        ({"timeout": "5"}, "timeout must be a number of seconds"),
        ({"breaker": "payments"}, "breaker must be a CircuitBreaker"),
        ({"retry": 3}, "retry must be a policy made by resilient.retry"),
        ({"retry_methods": "GET"}, "retry_methods is a collection of methods"),
        ({"retry_statuses": {503, 99}}, "retry_statuses must be HTTP status codes"),
        ({"retry_errors": [httpx.ConnectError]}, "retry_errors must be a tuple"),
        ({"retry_errors": (KeyboardInterrupt,)}, "retry_errors must be a tuple"),
        ({"failure_when": 500}, "failure_when must be a predicate"),
    ],
)
@pytest.mark.parametrize("kind", [ResilientTransport, SyncResilientTransport])
def test_bad_options_are_refused_at_construction(
    kind: type[Any], options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        kind(httpx.MockTransport(lambda request: httpx.Response(200)), **options)


def test_retry_methods_are_compared_in_upper_case() -> None:
    transport = ResilientTransport(retry_methods=["get", "post"])
    assert transport.options.retry_methods == {"GET", "POST"}


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("http://a.test/x?y=1", "http://a.test:80"),
        ("https://a.test", "https://a.test:443"),
        ("https://A.test:8443/", "https://a.test:8443"),
        ("http://[2001:db8::1]/", "http://[2001:db8::1]:80"),
    ],
)
def test_the_origin_names_scheme_host_and_port(url: str, origin: str) -> None:
    assert origin_of(httpx.URL(url)) == origin


@pytest.mark.parametrize(
    ("status", "failed"), [(200, False), (404, False), (429, True), (500, True), (503, True)]
)
def test_server_errors_and_429_count_as_failures(status: int, failed: bool) -> None:
    assert is_failure(httpx.Response(status)) is failed


def test_the_sync_transport_refuses_an_async_sleep_up_front() -> None:
    clock = FakeClock()
    with pytest.raises(ConfigurationError, match="sleep must be too"):
        SyncResilientTransport(retry=make_retry(sleep=clock.sleep))
