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

Both take the same options (one :class:`TransportOptions`, checked when made) and run the
same flow: what is retried, which breaker an attempt passes, what counts as a failure,
which responses are closed, and in what order, is decided once, by generators that yield
what they need done (send this request, close that response, call this through the
breaker or the retry policy) and are sent the outcome, like httpx's own ``auth_flow``.
Each transport only carries those needs out, awaiting or blocking: logic once, I/O twice.

This module needs httpx (``pip install 'resilient-asgi[httpx]'``); ``import resilient``
does not import it.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable, Collection, Generator
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Generic, Literal, NamedTuple, TypeAlias, TypeVar, cast

try:
    import httpx
except ImportError as error:  # pragma: no cover (the test suite always has httpx)
    msg = "resilient.httpx needs httpx: pip install 'resilient-asgi[httpx]'"
    raise ImportError(msg) from error

from resilient.breaker import BreakerRegistry, CircuitBreaker
from resilient.errors import CircuitOpenError, ConfigurationError
from resilient.retries import Attempt, Retry, retry
from resilient.retries.core import validate_seconds

__all__ = [
    "DEFAULT_RETRY",
    "RETRY_ERRORS",
    "RETRY_METHODS",
    "RETRY_STATUSES",
    "ResilientTransport",
    "SyncResilientTransport",
    "TransportOptions",
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


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportOptions:
    """The options of both transports, checked when made; see :class:`ResilientTransport`.

    Bad values raise :class:`~resilient.errors.ConfigurationError`. ``retry_methods`` is
    kept in upper case and ``retry_statuses`` as a frozenset.

    >>> TransportOptions(timeout=2.0, retry_methods=["get"]).retry_methods
    frozenset({'GET'})
    """

    breaker: BreakerChoice = None
    retry: Retry | None = DEFAULT_RETRY
    timeout: float | None = None
    retry_methods: Collection[str] = RETRY_METHODS
    retry_statuses: Collection[int] = RETRY_STATUSES
    retry_errors: tuple[type[Exception], ...] = RETRY_ERRORS
    failure_when: Callable[[httpx.Response], bool] = is_failure

    def __post_init__(self) -> None:
        keep = functools.partial(object.__setattr__, self)  # frozen: set once, here
        if self.timeout is not None:
            keep("timeout", validate_seconds("timeout", self.timeout))
        methods = self.retry_methods
        if isinstance(methods, str):
            msg = f"retry_methods is a collection of methods, not the string {methods!r}"
            raise ConfigurationError(msg)
        keep("retry_methods", frozenset(method.upper() for method in methods))
        statuses = frozenset(self.retry_statuses)
        if not all(isinstance(s, int) and 100 <= s <= 599 for s in statuses):
            msg = f"retry_statuses must be HTTP status codes, not {sorted(statuses)!r}"
            raise ConfigurationError(msg)
        keep("retry_statuses", statuses)
        errors = self.retry_errors
        if not isinstance(errors, tuple) or not all(
            isinstance(kind, type) and issubclass(kind, Exception) for kind in errors
        ):
            msg = f"retry_errors must be a tuple of Exception types, not {errors!r}"
            raise ConfigurationError(msg)
        if not callable(self.failure_when):
            msg = f"failure_when must be a predicate on a response, not {self.failure_when!r}"
            raise ConfigurationError(msg)
        if self.retry is not None and not isinstance(self.retry, Retry):
            msg = f"retry must be a policy made by resilient.retry(...) or None, not {self.retry!r}"
            raise ConfigurationError(msg)
        if _own_registry(self.breaker) is None:
            _breaker_lookup(self.breaker)  # raises for what is not a breaker choice


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


def _failed_response(request: httpx.Request, response: httpx.Response) -> httpx.HTTPStatusError:
    """Return what a breaker records for a response judged failed (by ``failure_when``).

    A breaker learns of failures from exceptions, so a failed response is recorded as an
    ``httpx.HTTPStatusError`` (what breakers' ``record=`` can name); the caller still gets
    the response, like any other.
    """
    message = f"{response.status_code} {response.reason_phrase} from {request.url}"
    return httpx.HTTPStatusError(message, request=request, response=response)


# What a flow needs its transport to do, and what it is sent back.
class _Send(NamedTuple):
    """Send *request* through the wrapped transport, within the attempt's timeout."""

    request: httpx.Request  # answered with the response


class _Close(NamedTuple):
    """Close *response*, whose connection goes back to the pool."""

    response: httpx.Response  # answered with None


class _Claim(NamedTuple):
    """Claim *breaker*'s shared probe lease, then admit the attempt (``admit_after_claim``)."""

    breaker: CircuitBreaker  # answered with the attempt's ticket


class _Wait(NamedTuple):
    """Wait *seconds* before the next attempt, with the retry policy's sleep (``pause``)."""

    policy: Retry
    seconds: float  # answered with None


class _Fallback(NamedTuple):
    """Answer with the open breaker's *fallback* for *request*; await it if it is awaitable."""

    fallback: Callable[..., Any]
    request: httpx.Request  # answered with its answer


_Need: TypeAlias = _Send | _Close | _Claim | _Wait | _Fallback
_Flow: TypeAlias = Generator[_Need, Any, httpx.Response]


class _Core:
    """The flow of a request through retry, breaker and the wrapped transport; no I/O.

    A flow is one generator per request: it yields a :data:`_Need`, is sent its outcome
    (or has its exception thrown in) and returns the response. It drives the breaker and
    the retry policy through their public steps (:meth:`CircuitBreaker.admit`,
    :meth:`~CircuitBreaker.returned`, :meth:`~CircuitBreaker.raised`; :meth:`Retry.begin`,
    :meth:`Retry.steps`), so the transport carries out every wait and every call itself.
    """

    __slots__ = ("breaker_for", "options", "plain", "policy", "registry")

    def __init__(self, options: TransportOptions) -> None:
        self.options = options
        # A registry made here is the transport's own: closing the transport clears it.
        self.registry = _own_registry(options.breaker)
        self.breaker_for = (
            _breaker_lookup(options.breaker) if self.registry is None else self.registry.get
        )
        policy = options.retry
        self.policy = None if policy is None else self._narrow(policy)
        # Nothing between the caller and the wrapped transport but the timeout.
        self.plain = self.policy is None and self.breaker_for is None

    def _narrow(self, policy: Retry) -> Retry:
        """Return *policy* retrying what this transport retries, and what *policy* allows.

        The transport decides what is worth another attempt (``retry_errors``,
        ``retry_statuses``); the policy's own ``on=`` and ``result=`` narrow that further.
        Its waits, deadline, budget, clock, sleep and observer are kept as they are.
        """
        errors, statuses = self.options.retry_errors, self.options.retry_statuses
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
        if self.policy is None:
            return False
        methods = self.options.retry_methods
        if request.method not in methods and "idempotency-key" not in request.headers:
            return False
        try:
            request.content  # noqa: B018 (raises RequestNotRead for a streaming body)
        except httpx.RequestNotRead:
            return isinstance(request.stream, httpx.ByteStream)
        return True

    def request(self, request: httpx.Request) -> _Flow:
        """Return the flow of *request*: its attempts, to the response the caller gets."""
        policy = self.policy
        if policy is None or not self.retries(request):
            return self._attempt(request)
        return self._retried(request, policy)

    def _retried(self, request: httpx.Request, policy: Retry) -> _Flow:
        """Make attempts until one is not retried, as :meth:`Retry.steps` decides."""
        started = policy.begin()
        previous: list[httpx.Response] = []  # the response the next attempt replaces
        try:
            response = yield from self._attempt(request)
        except Exception as error:
            if not policy.retryable(error):
                raise
            first = Attempt(1, error=error)
        else:
            wanted = policy.options.result
            if wanted is None or not wanted(response):
                return response
            first = Attempt(1, value=response)
            previous.append(response)
        last = first
        try:
            for step in policy.steps(first, policy.name or "resilient.httpx", started):
                if isinstance(step, Attempt):
                    if previous:
                        yield _Close(previous.pop())
                    last = step
                    with step:
                        step.value = response = yield from self._attempt(request)
                        previous.append(response)
                else:
                    yield _Wait(policy, step)
        except BaseException:
            # Cancelled while waiting to retry: the response being retried is still open.
            for opened in previous:
                yield _Close(opened)
            raise
        return cast("httpx.Response", last.outcome())

    def _attempt(self, request: httpx.Request) -> _Flow:
        """One attempt: breaker -> the transport."""
        breaker_for = self.breaker_for
        if breaker_for is None:
            response: httpx.Response = yield _Send(request)
            return response
        breaker = breaker_for(origin_of(request.url))
        try:
            ticket = breaker.admit()
            if ticket is None:
                ticket = yield _Claim(breaker)
        except CircuitOpenError:
            if breaker.fallback is None:
                raise
            answer: httpx.Response = yield _Fallback(breaker.fallback, request)
            return answer
        started = breaker.start_time()
        try:
            response = yield _Send(request)
        except BaseException as error:
            breaker.raised(ticket, started, error)
            raise
        if self.options.failure_when(response):
            breaker.raised(ticket, started, _failed_response(request, response))
            return response
        return breaker.returned(ticket, started, response)

    def closed(self) -> None:
        """Drop the breakers made per origin: the transport was closed."""
        if self.registry is not None:
            self.registry.clear()


class _Steps:
    """One flow, stepped by a transport that carries out its needs (see :class:`_Core`).

    :meth:`next` returns the flow's next need, or ``None`` once the flow has returned
    (:attr:`response` then holds what it returned); the transport answers each need with
    :meth:`reply` or :meth:`fail` before asking for the next. An exception the flow lets
    out comes out of :meth:`next`.
    """

    __slots__ = ("_answer", "_flow", "_value", "response")

    def __init__(self, flow: _Flow) -> None:
        self._flow = flow
        self._answer: Callable[[Any], _Need] = flow.send
        self._value: Any = None
        self.response: httpx.Response

    def next(self) -> _Need | None:
        """Return the flow's next need, or ``None`` when it has returned its response."""
        try:
            return self._answer(self._value)
        except StopIteration as done:
            self.response = done.value
            return None
        finally:
            self._value = None  # an error kept here would keep its traceback alive

    def reply(self, value: object) -> None:
        """Answer the need at hand with *value*."""
        self._answer, self._value = self._flow.send, value

    def fail(self, error: BaseException) -> None:
        """Answer the need at hand with *error*, raised in the flow where it yielded."""
        self._answer, self._value = self._flow.throw, error


_Wrapped = TypeVar("_Wrapped", httpx.AsyncBaseTransport, httpx.BaseTransport)


class _Transport(Generic[_Wrapped]):
    """The constructor both transports share: their options are spelled here only."""

    def __init__(
        self,
        transport: _Wrapped | None = None,
        *,
        breaker: BreakerChoice = None,
        retry: Retry | None = DEFAULT_RETRY,
        timeout: float | None = None,
        retry_methods: Collection[str] = RETRY_METHODS,
        retry_statuses: Collection[int] = RETRY_STATUSES,
        retry_errors: tuple[type[Exception], ...] = RETRY_ERRORS,
        failure_when: Callable[[httpx.Response], bool] = is_failure,
    ) -> None:
        self.options = TransportOptions(
            breaker=breaker,
            retry=retry,
            timeout=timeout,
            retry_methods=retry_methods,
            retry_statuses=retry_statuses,
            retry_errors=retry_errors,
            failure_when=failure_when,
        )
        self.transport: _Wrapped = transport if transport is not None else self._new_transport()
        self._core = _Core(self.options)
        if self._sync and self._core.policy is not None:
            self._core.policy.check_sync_sleep(type(self).__name__)

    _sync: ClassVar[bool]
    """Whether the transport blocks (its retry policy's sleep must too)."""

    def _new_transport(self) -> _Wrapped:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transport!r})"


class ResilientTransport(_Transport[httpx.AsyncBaseTransport], httpx.AsyncBaseTransport):
    """An ``httpx`` transport for ``AsyncClient`` that retries and breaks circuits per host.

    >>> client = httpx.AsyncClient(transport=ResilientTransport(timeout=2.0))

    Each attempt passes a circuit breaker, then a timeout, then *transport* (a new
    ``httpx.AsyncHTTPTransport()`` by default); the whole is retried by *retry*. The
    options are kept, checked, in :attr:`options` (a :class:`TransportOptions`).

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

    def _new_transport(self) -> httpx.AsyncBaseTransport:
        return httpx.AsyncHTTPTransport()

    _sync = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send *request* through retry, breaker and timeout; return the final response."""
        core = self._core
        if core.plain:
            return await self._send(request)
        steps = _Steps(core.request(request))
        while (need := steps.next()) is not None:
            try:
                if isinstance(need, _Send):
                    steps.reply(await self._send(need.request))
                elif isinstance(need, _Close):
                    await need.response.aclose()
                    steps.reply(None)
                elif isinstance(need, _Claim):
                    steps.reply(await need.breaker.admit_after_claim())
                elif isinstance(need, _Wait):
                    await need.policy.pause_async(need.seconds)
                    steps.reply(None)
                else:
                    answer = need.fallback(need.request)
                    steps.reply(await answer if inspect.isawaitable(answer) else answer)
            except BaseException as error:  # raised in the flow, which decides
                steps.fail(error)
        return steps.response

    async def _send(self, request: httpx.Request) -> httpx.Response:
        timeout = self.options.timeout
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
        self._core.closed()


class SyncResilientTransport(_Transport[httpx.BaseTransport], httpx.BaseTransport):
    """:class:`ResilientTransport` for ``httpx.Client``: the same options, the same flow.

    >>> client = httpx.Client(transport=SyncResilientTransport(timeout=2.0))

    It wraps an ``httpx.BaseTransport`` (a new ``httpx.HTTPTransport()`` by default), and
    a *retry* policy given to it must have a synchronous ``sleep`` (or none). A blocking
    call cannot be interrupted, so *timeout* is handed to httpx as the request's
    connect, read, write and pool timeouts (each the smaller of it and the client's): it
    bounds each network operation of an attempt rather than the attempt as a whole, and
    running out raises httpx's own ``ConnectTimeout``, ``ReadTimeout``, ... (all
    ``httpx.TimeoutException``).
    """

    def _new_transport(self) -> httpx.BaseTransport:
        return httpx.HTTPTransport()

    _sync = True

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send *request* through retry, breaker and timeout; return the final response."""
        core = self._core
        if core.plain:
            return self._send(request)
        steps = _Steps(core.request(request))
        while (need := steps.next()) is not None:
            try:
                if isinstance(need, _Send):
                    steps.reply(self._send(need.request))
                elif isinstance(need, _Close):
                    need.response.close()
                    steps.reply(None)
                elif isinstance(need, _Claim):
                    steps.reply(need.breaker.admit_after_claim_sync())
                elif isinstance(need, _Wait):
                    need.policy.pause(need.seconds)
                    steps.reply(None)
                else:
                    steps.reply(need.fallback(need.request))
            except BaseException as error:  # raised in the flow, which decides
                steps.fail(error)
        return steps.response

    def _send(self, request: httpx.Request) -> httpx.Response:
        timeout = self.options.timeout
        if timeout is not None:
            request.extensions = {**request.extensions, "timeout": _capped(request, timeout)}
        return self.transport.handle_request(request)

    def close(self) -> None:
        """Close the wrapped transport; drop the breakers made per origin (see *breaker*)."""
        self.transport.close()
        self._core.closed()


def _capped(request: httpx.Request, timeout: float) -> dict[str, Any]:
    """Return the request's timeouts, each no longer than *timeout*."""
    current = request.extensions.get("timeout") or {}
    capped: dict[str, Any] = {}
    for operation in ("connect", "read", "write", "pool"):
        seconds = current.get(operation)
        capped[operation] = timeout if seconds is None else min(seconds, timeout)
    return capped
