"""httpx transports that retry, break circuits per host and bound each attempt's time.

::

    client = httpx.AsyncClient(transport=ResilientTransport())
    client = httpx.Client(transport=SyncResilientTransport())

Each request goes through, outermost first::

    retry  ->  circuit breaker (per host)  ->  attempt timeout  ->  the wrapped transport

so the breaker sees every attempt (the real load on the host), each attempt has its own
time, and an open circuit is one more failure for the retry to judge: it waits for the
circuit's ``retry_after`` when that fits in the deadline, and gives up at once otherwise.

* :class:`ResilientTransport` wraps an ``httpx.AsyncBaseTransport`` (an
  ``httpx.AsyncHTTPTransport()`` by default), for ``httpx.AsyncClient``;
* :class:`SyncResilientTransport` wraps an ``httpx.BaseTransport`` (an
  ``httpx.HTTPTransport()`` by default), for ``httpx.Client``.

Both share one set of decisions: which breaker, whether to retry, what counts as a
failure. Only the calls into the wrapped transport are written twice.

This module needs httpx (``pip install 'resilient-asgi[httpx]'``); ``import resilient``
does not import it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from typing import Any, Final, Literal, TypeAlias

try:
    import httpx
except ImportError as error:  # pragma: no cover (the test suite always has httpx)
    msg = "resilient.httpx needs httpx: pip install 'resilient-asgi[httpx]'"
    raise ImportError(msg) from error

from resilient.breaker import BreakerRegistry, CircuitBreaker
from resilient.errors import CircuitOpenError, ConfigurationError
from resilient.retries import Retry, retry
from resilient.retries.core import validate_seconds

__all__ = [
    "DEFAULT_RETRY",
    "RETRY_ERRORS",
    "RETRY_METHODS",
    "RETRY_STATUSES",
    "ResilientTransport",
    "SyncResilientTransport",
    "is_failure",
    "origin_of",
]

RETRY_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
"""The methods RFC 9110 calls idempotent: the ones retried without an ``Idempotency-Key``."""

RETRY_STATUSES: Final = frozenset({429, 502, 503, 504})
"""Response statuses worth another attempt: the server asks for one, or a gateway failed."""

RETRY_ERRORS: Final[tuple[type[Exception], ...]] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
    CircuitOpenError,
)
"""Exceptions worth another attempt: timeouts, broken connections, a server that hung
up mid-response, and open circuits (whose ``retry_after`` the retry waits, deadline
permitting). Not retried: ``httpx.UnsupportedProtocol``, ``httpx.LocalProtocolError`` and
other mistakes on our side, which another attempt would only repeat."""

DEFAULT_RETRY: Final = retry(attempts=3, deadline=10.0, base=0.1, cap=2.0, name="resilient.httpx")
"""The retry policy of a transport made without ``retry=``: three attempts at most,
jittered waits from 0.1 s up to 2 s (longer when a ``Retry-After`` asks for it), and never
past 10 seconds from the first attempt."""

BreakerChoice: TypeAlias = (
    CircuitBreaker | BreakerRegistry | Callable[[str], CircuitBreaker] | Literal[False] | None
)
"""What ``breaker=`` accepts; see :class:`ResilientTransport`."""

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def is_failure(response: httpx.Response) -> bool:
    """Return whether *response* counts as a failure for a circuit breaker: 5xx or 429.

    The default ``failure_when`` of the transports. A 429 counts because it is the host
    saying it is overloaded; other 4xx are the caller's mistakes, not the host's health.
    """
    return response.status_code >= 500 or response.status_code == 429


def origin_of(url: httpx.URL) -> str:
    """Return the origin of *url* as ``scheme://host:port``, the default breaker key.

    >>> origin_of(httpx.URL("https://api.example.com/v1/prices?sku=42"))
    'https://api.example.com:443'
    """
    port = url.port or _DEFAULT_PORTS.get(url.scheme)
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{url.scheme}://{host}:{port}" if port else f"{url.scheme}://{host}"


def _default_breaker(origin: str) -> CircuitBreaker:
    return CircuitBreaker(origin, failure_rate=0.5, minimum_calls=10, window=20, open_for=30.0)


class _FailedResponse(httpx.HTTPStatusError):
    """A response judged failed (by ``failure_when``), on its way through the breaker.

    A breaker learns of failures from exceptions, so a failed response is raised through
    it as an ``httpx.HTTPStatusError`` (what breakers' ``record=`` can name), then caught
    outside it and returned to the caller like any other response.
    """


class _Resilience:
    """The configuration and the decisions both transports share; no I/O."""

    def __init__(
        self,
        *,
        breaker: BreakerChoice,
        retry: Retry | None,
        timeout: float | None,
        retry_methods: Collection[str],
        retry_statuses: Collection[int],
        retry_errors: tuple[type[Exception], ...],
        failure_when: Callable[[httpx.Response], bool],
    ) -> None:
        self.timeout = None if timeout is None else validate_seconds("timeout", timeout)
        if isinstance(retry_methods, str):
            msg = f"retry_methods is a collection of methods, not the string {retry_methods!r}"
            raise ConfigurationError(msg)
        self.retry_methods = frozenset(method.upper() for method in retry_methods)
        self.retry_statuses = frozenset(retry_statuses)
        if not all(isinstance(s, int) and 100 <= s <= 599 for s in self.retry_statuses):
            msg = f"retry_statuses must be HTTP status codes, not {sorted(retry_statuses)!r}"
            raise ConfigurationError(msg)
        if not isinstance(retry_errors, tuple) or not all(
            isinstance(kind, type) and issubclass(kind, Exception) for kind in retry_errors
        ):
            msg = f"retry_errors must be a tuple of Exception types, not {retry_errors!r}"
            raise ConfigurationError(msg)
        self.retry_errors = retry_errors
        if not callable(failure_when):
            msg = f"failure_when must be a predicate on a response, not {failure_when!r}"
            raise ConfigurationError(msg)
        self.failure_when = failure_when
        # A registry made here is the transport's own: closing the transport clears it.
        self.registry = _own_registry(breaker)
        self.breaker_for = _breaker_lookup(breaker) if self.registry is None else self.registry.get
        self.retry = None if retry is None else self._narrow(retry)

    def _narrow(self, policy: Retry) -> Retry:
        """Return *policy* retrying what this transport retries, and what *policy* allows.

        The transport decides what is worth another attempt (``retry_errors``,
        ``retry_statuses``); the policy's own ``on=`` and ``result=`` narrow that further.
        Its waits, deadline, budget, clock, sleep and observer are kept as they are.
        """
        if not isinstance(policy, Retry):
            msg = f"retry must be a policy made by resilient.retry(...) or None, not {policy!r}"
            raise ConfigurationError(msg)
        errors, statuses = self.retry_errors, self.retry_statuses
        return policy.narrowed(
            on=lambda error: isinstance(error, errors),
            result=lambda response: response.status_code in statuses,
            name=policy.name or "resilient.httpx",
        )

    def retries(self, request: httpx.Request) -> bool:
        """Return whether *request* may be sent more than once.

        It may when there is a retry policy, its method is idempotent or it carries an
        ``Idempotency-Key``, and its body can be sent again (it is in memory).
        """
        if self.retry is None:
            return False
        if request.method not in self.retry_methods and "idempotency-key" not in request.headers:
            return False
        try:
            request.content  # noqa: B018 (raises RequestNotRead for a streaming body)
        except httpx.RequestNotRead:
            return isinstance(request.stream, httpx.ByteStream)
        return True

    def failed(self, request: httpx.Request, response: httpx.Response) -> _FailedResponse | None:
        """Return the exception that reports *response* to the breaker, if it failed."""
        if not self.failure_when(response):
            return None
        message = f"{response.status_code} {response.reason_phrase} from {request.url}"
        return _FailedResponse(message, request=request, response=response)


def _own_registry(breaker: BreakerChoice) -> BreakerRegistry | None:
    """Return the registry a transport makes for *breaker*, if it makes one."""
    if breaker is None:
        return BreakerRegistry(_default_breaker)
    if (
        breaker is not False
        and not isinstance(breaker, (CircuitBreaker, BreakerRegistry))
        and callable(breaker)
    ):
        return BreakerRegistry(breaker)  # made once per origin, not once per request
    return None


def _breaker_lookup(breaker: BreakerChoice) -> Callable[[str], CircuitBreaker] | None:
    """Return origin -> breaker for *breaker* given as a breaker, a registry or ``False``."""
    if breaker is False:
        return None
    if isinstance(breaker, CircuitBreaker):  # before callable(): a breaker is a decorator
        return lambda origin: breaker
    if isinstance(breaker, BreakerRegistry):
        return breaker.get
    msg = (
        "breaker must be a CircuitBreaker, a BreakerRegistry, a function of the origin "
        f"returning a CircuitBreaker, None (one per origin) or False (none), not {breaker!r}"
    )
    raise ConfigurationError(msg)


class ResilientTransport(httpx.AsyncBaseTransport):
    """An ``httpx`` transport for ``AsyncClient`` that retries and breaks circuits per host.

    >>> client = httpx.AsyncClient(transport=ResilientTransport(timeout=2.0))

    Each attempt passes a circuit breaker, then a timeout, then *transport* (a new
    ``httpx.AsyncHTTPTransport()`` by default); the whole is retried by *retry*.

    *breaker*: ``None`` (the default) makes one :class:`~resilient.CircuitBreaker` per
    origin (``scheme://host:port``), named by it, opening when half of the last 20
    attempts, at least 10, failed, for 30 seconds. Pass a
    :class:`~resilient.BreakerRegistry` (keyed by origin) or a function of the origin
    returning a breaker (called once per origin) for other settings, one
    ``CircuitBreaker`` to share between every host, or ``False`` for none. The breakers
    made for ``None`` or a function are kept in a registry of the transport's own, at most
    1,024, and dropped when the transport is closed; one that shares its state through a
    backend leaves it then, so the next transport can make a breaker of the same name.
    Transport errors and responses for which *failure_when* is true (5xx and 429 by
    default) count as failures: a failed response reaches the breaker as an
    ``httpx.HTTPStatusError``, so a breaker's own ``record=`` must include it to count
    them. An open circuit raises :class:`~resilient.CircuitOpenError` without touching
    the network.

    *retry*: a policy made by :func:`~resilient.retry` (its attempts, deadline, waits,
    budget), :data:`DEFAULT_RETRY` by default, or ``None`` for a single attempt. Only
    requests whose method is in *retry_methods*, or that carry an ``Idempotency-Key``
    header, are retried, and only when their body is in memory (a streaming body is sent
    once; read it first to make it retryable). Retried: exceptions of *retry_errors*
    (:data:`RETRY_ERRORS`) and responses with a status in *retry_statuses*
    (:data:`RETRY_STATUSES`), narrowed by the policy's own ``on=`` and ``result=``. A
    ``Retry-After`` header, or an open circuit's ``retry_after``, stretches the wait, and
    a wait that would pass the deadline ends the retries instead. A response that is
    retried is closed first; when retries run out, the caller gets the last response or
    exception.

    *timeout*: seconds for each attempt until the response's headers arrive; an attempt
    that runs out raises ``httpx.TimeoutException`` (a transport error, so it is retried
    and counted by the breaker like httpx's own timeouts). The body is read later, by the
    caller, under the client's timeouts.
    """

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        breaker: BreakerChoice = None,
        retry: Retry | None = DEFAULT_RETRY,
        timeout: float | None = None,
        retry_methods: Collection[str] = RETRY_METHODS,
        retry_statuses: Collection[int] = RETRY_STATUSES,
        retry_errors: tuple[type[Exception], ...] = RETRY_ERRORS,
        failure_when: Callable[[httpx.Response], bool] = is_failure,
    ) -> None:
        self.transport = transport if transport is not None else httpx.AsyncHTTPTransport()
        self.resilience = _Resilience(
            breaker=breaker,
            retry=retry,
            timeout=timeout,
            retry_methods=retry_methods,
            retry_statuses=retry_statuses,
            retry_errors=retry_errors,
            failure_when=failure_when,
        )
        retried = self.resilience.retry
        self._retried = None if retried is None else retried(self._attempt_after)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send *request* through retry, breaker and timeout; return the final response."""
        if self._retried is None or not self.resilience.retries(request):
            return await self._attempt(request)
        previous: list[httpx.Response] = []
        try:
            return await self._retried(request, previous)
        except BaseException:
            # Cancelled while waiting to retry: the response being retried is still open.
            for response in previous:
                await response.aclose()
            raise

    async def _attempt_after(
        self, request: httpx.Request, previous: list[httpx.Response]
    ) -> httpx.Response:
        """One attempt of a retried request, after closing the response it replaces."""
        if previous:
            await previous.pop().aclose()
        response = await self._attempt(request)
        previous.append(response)
        return response

    async def _attempt(self, request: httpx.Request) -> httpx.Response:
        """One attempt: breaker -> timeout -> the wrapped transport."""
        breaker_for = self.resilience.breaker_for
        if breaker_for is None:
            return await self._send(request)
        breaker = breaker_for(origin_of(request.url))
        try:
            response: httpx.Response = await breaker.call(self._judged, request)
        except _FailedResponse as failed:
            return failed.response
        return response

    async def _judged(self, request: httpx.Request) -> httpx.Response:
        response = await self._send(request)
        failed = self.resilience.failed(request, response)
        if failed is not None:
            raise failed
        return response

    async def _send(self, request: httpx.Request) -> httpx.Response:
        timeout = self.resilience.timeout
        if timeout is None:
            return await self.transport.handle_async_request(request)
        try:
            async with asyncio.timeout(timeout):
                return await self.transport.handle_async_request(request)
        except TimeoutError as error:
            message = f"no response from {request.url} within {timeout}s"
            raise httpx.TimeoutException(message, request=request) from error

    async def aclose(self) -> None:
        """Close the wrapped transport; drop the breakers made per origin (see *breaker*)."""
        await self.transport.aclose()
        if self.resilience.registry is not None:
            self.resilience.registry.clear()

    def __repr__(self) -> str:
        return f"ResilientTransport({self.transport!r})"


class SyncResilientTransport(httpx.BaseTransport):
    """The twin of :class:`ResilientTransport` for ``httpx.Client``, with the same options.

    >>> client = httpx.Client(transport=SyncResilientTransport(timeout=2.0))

    It wraps an ``httpx.BaseTransport`` (a new ``httpx.HTTPTransport()`` by default), and
    a *retry* policy given to it must have a synchronous ``sleep`` (or none). A blocking
    call cannot be interrupted, so *timeout* is handed to httpx as the request's
    connect, read, write and pool timeouts (each the smaller of it and the client's): it
    bounds each network operation of an attempt rather than the attempt as a whole, and
    running out raises httpx's own ``ConnectTimeout``, ``ReadTimeout``, ... (all
    ``httpx.TimeoutException``).
    """

    def __init__(
        self,
        transport: httpx.BaseTransport | None = None,
        *,
        breaker: BreakerChoice = None,
        retry: Retry | None = DEFAULT_RETRY,
        timeout: float | None = None,
        retry_methods: Collection[str] = RETRY_METHODS,
        retry_statuses: Collection[int] = RETRY_STATUSES,
        retry_errors: tuple[type[Exception], ...] = RETRY_ERRORS,
        failure_when: Callable[[httpx.Response], bool] = is_failure,
    ) -> None:
        self.transport = transport if transport is not None else httpx.HTTPTransport()
        self.resilience = _Resilience(
            breaker=breaker,
            retry=retry,
            timeout=timeout,
            retry_methods=retry_methods,
            retry_statuses=retry_statuses,
            retry_errors=retry_errors,
            failure_when=failure_when,
        )
        retried = self.resilience.retry
        self._retried = None if retried is None else retried(self._attempt_after)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send *request* through retry, breaker and timeout; return the final response."""
        timeout = self.resilience.timeout
        if timeout is not None:
            request.extensions = {**request.extensions, "timeout": _capped(request, timeout)}
        if self._retried is None or not self.resilience.retries(request):
            return self._attempt(request)
        previous: list[httpx.Response] = []
        try:
            return self._retried(request, previous)
        except BaseException:
            for response in previous:
                response.close()
            raise

    def _attempt_after(
        self, request: httpx.Request, previous: list[httpx.Response]
    ) -> httpx.Response:
        """One attempt of a retried request, after closing the response it replaces."""
        if previous:
            previous.pop().close()
        response = self._attempt(request)
        previous.append(response)
        return response

    def _attempt(self, request: httpx.Request) -> httpx.Response:
        """One attempt: breaker -> the wrapped transport (the timeout is in the request)."""
        breaker_for = self.resilience.breaker_for
        if breaker_for is None:
            return self.transport.handle_request(request)
        breaker = breaker_for(origin_of(request.url))
        try:
            return breaker.call(self._judged, request)
        except _FailedResponse as failed:
            return failed.response

    def _judged(self, request: httpx.Request) -> httpx.Response:
        response = self.transport.handle_request(request)
        failed = self.resilience.failed(request, response)
        if failed is not None:
            raise failed
        return response

    def close(self) -> None:
        """Close the wrapped transport; drop the breakers made per origin (see *breaker*)."""
        self.transport.close()
        if self.resilience.registry is not None:
            self.resilience.registry.clear()

    def __repr__(self) -> str:
        return f"SyncResilientTransport({self.transport!r})"


def _capped(request: httpx.Request, timeout: float) -> dict[str, Any]:
    """Return the request's timeouts, each no longer than *timeout*."""
    current = request.extensions.get("timeout") or {}
    capped: dict[str, Any] = {}
    for operation in ("connect", "read", "write", "pool"):
        seconds = current.get(operation)
        capped[operation] = timeout if seconds is None else min(seconds, timeout)
    return capped
