"""A real upstream server on a loopback port, transports that count responses, and
:class:`Via`: each behaviour test runs through both transports, async and sync."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from resilient import ResilientTransport, SyncResilientTransport
from resilient._asgi import Receive, Scope, Send
from resilient.testing import FakeClock
from tests.retry.conftest import AsyncSleeper, Sleeper


class Upstream:
    """An ASGI app with scripted answers, which counts the requests it receives.

    ``/status/<code>`` answers ``<code>``; ``/scripted`` answers the next of
    :attr:`statuses` (200 once they run out); ``/stall`` answers only when the test ends.
    """

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.hits: Counter[str] = Counter()
        self.bodies: list[bytes] = []
        self.release = threading.Event()

    def reset(self) -> None:
        self.release.set()  # lets stalled requests of the last test finish
        self.release = threading.Event()
        self.statuses = []
        self.hits = Counter()
        self.bodies = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        path: str = scope["path"]
        self.hits[path] += 1
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.bodies.append(body)
        status = 200
        if path == "/stall":
            await asyncio.to_thread(self.release.wait)
        elif path == "/scripted" and self.statuses:
            status = self.statuses.pop(0)
        elif path.startswith("/status/"):
            status = int(path.removeprefix("/status/"))
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"answer " * 100})


@contextlib.contextmanager
def serving(app: Upstream) -> Iterator[str]:
    """Serve *app* with uvicorn in a thread on a free loopback port; yield its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:  # a real server starting up: nothing to fake here
        assert thread.is_alive(), "uvicorn stopped while starting"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        app.release.set()
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def live_upstream() -> Iterator[tuple[Upstream, str]]:
    app = Upstream()
    with serving(app) as url:
        yield app, url


@pytest.fixture
def upstream(live_upstream: tuple[Upstream, str]) -> Iterator[Upstream]:
    """The session's upstream app, reset for this test."""
    app, _ = live_upstream
    app.reset()
    yield app
    app.reset()


@pytest.fixture
def base_url(live_upstream: tuple[Upstream, str]) -> str:
    return live_upstream[1]


@pytest.fixture
def closed_port_url() -> str:
    """A loopback URL nothing listens on: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class _CountedStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body that tells its counter when it is closed, read either way."""

    def __init__(self, stream: httpx.SyncByteStream | httpx.AsyncByteStream, counter: Counting):
        self.stream = stream
        self.counter = counter

    def __iter__(self) -> Iterator[bytes]:
        assert isinstance(self.stream, httpx.SyncByteStream)
        yield from self.stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        assert isinstance(self.stream, httpx.AsyncByteStream)
        async for chunk in self.stream:
            yield chunk

    def close(self) -> None:
        self.counter.closed += 1
        assert isinstance(self.stream, httpx.SyncByteStream)
        self.stream.close()

    async def aclose(self) -> None:
        self.counter.closed += 1
        assert isinstance(self.stream, httpx.AsyncByteStream)
        await self.stream.aclose()


class Counting(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Wraps a transport, sync or async; counts the responses it returns and those closed."""

    def __init__(self, transport: httpx.BaseTransport | httpx.AsyncBaseTransport) -> None:
        self.transport = transport
        self.opened = 0
        self.closed = 0

    @property
    def open(self) -> int:
        return self.opened - self.closed

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(self.transport, httpx.BaseTransport)
        return self._counted(self.transport.handle_request(request))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(self.transport, httpx.AsyncBaseTransport)
        return self._counted(await self.transport.handle_async_request(request))

    def _counted(self, response: httpx.Response) -> httpx.Response:
        self.opened += 1
        assert isinstance(response.stream, httpx.SyncByteStream | httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_CountedStream(response.stream, self),
            extensions=response.extensions,
        )

    def close(self) -> None:
        assert isinstance(self.transport, httpx.BaseTransport)
        self.transport.close()

    async def aclose(self) -> None:
        assert isinstance(self.transport, httpx.AsyncBaseTransport)
        await self.transport.aclose()


class Script:
    """A handler for ``httpx.MockTransport``: answers statuses in turn, per host.

    Each item is a status, a ``(status, headers)`` pair or an exception to raise.
    """

    def __init__(self, *answers: int | tuple[int, dict[str, str]] | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def hits(self, host: str | None = None) -> int:
        return sum(1 for r in self.requests if host is None or r.url.host == host)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if self.answers else 200
        if isinstance(answer, Exception):
            raise answer
        status, headers = answer if isinstance(answer, tuple) else (answer, {})
        return httpx.Response(status, headers=headers, text="answer")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sleeper(via: Via, clock: FakeClock) -> Sleeper:
    """A sleep for *via*'s transport, which records its waits and advances the clock."""
    return via.sleeper(clock)


class Client:
    """An ``httpx.AsyncClient`` or ``httpx.Client``, behind the same coroutine methods."""

    def __init__(self, http: httpx.AsyncClient | httpx.Client) -> None:
        self.http = http

    async def request(self, method: str, url: str, **options: Any) -> httpx.Response:
        if isinstance(self.http, httpx.AsyncClient):
            return await self.http.request(method, url, **options)
        return self.http.request(method, url, **options)

    async def get(self, url: str, **options: Any) -> httpx.Response:
        return await self.request("GET", url, **options)

    async def post(self, url: str, **options: Any) -> httpx.Response:
        return await self.request("POST", url, **options)

    async def put(self, url: str, **options: Any) -> httpx.Response:
        return await self.request("PUT", url, **options)

    def build_request(self, method: str, url: str, **options: Any) -> httpx.Request:
        return self.http.build_request(method, url, **options)

    async def send(self, request: httpx.Request) -> httpx.Response:
        if isinstance(self.http, httpx.AsyncClient):
            return await self.http.send(request)
        return self.http.send(request)


class Via:
    """One of the two transports, and what a test needs to drive it.

    A test that takes the ``via`` fixture runs once through :class:`ResilientTransport`
    (``via.is_async``) and once through :class:`SyncResilientTransport`: the same calls,
    the same assertions. Sync calls block the test's event loop, which nothing else needs
    meanwhile (the upstream server runs in a thread of its own).
    """

    def __init__(self, is_async: bool) -> None:
        self.is_async = is_async
        #: What interrupts a wait: cancellation in async code, ^C in sync code.
        self.interruption: type[BaseException] = (
            asyncio.CancelledError if is_async else KeyboardInterrupt
        )

    def resilient(
        self, inner: httpx.AsyncBaseTransport | httpx.BaseTransport | None = None, **options: Any
    ) -> ResilientTransport | SyncResilientTransport:
        """A resilient transport of this kind around *inner* (a network one by default)."""
        if self.is_async:
            assert inner is None or isinstance(inner, httpx.AsyncBaseTransport)
            return ResilientTransport(inner, **options)
        assert inner is None or isinstance(inner, httpx.BaseTransport)
        return SyncResilientTransport(inner, **options)

    def network(self, **options: Any) -> httpx.AsyncHTTPTransport | httpx.HTTPTransport:
        """httpx's own transport of this kind, over real TCP."""
        return (
            httpx.AsyncHTTPTransport(**options) if self.is_async else httpx.HTTPTransport(**options)
        )

    def sleeper(self, clock: FakeClock) -> Sleeper:
        """A sleep of this kind that records its waits and advances *clock*."""
        return AsyncSleeper(clock) if self.is_async else Sleeper(clock)

    def interrupting_sleep(self) -> Callable[[float], Any]:
        """A sleep of this kind that raises :attr:`interruption`."""
        interruption = self.interruption

        async def interrupted_async(seconds: float) -> None:
            raise interruption

        def interrupted(seconds: float) -> None:
            raise interruption

        return interrupted_async if self.is_async else interrupted

    def body(self, *parts: bytes) -> AsyncIterator[bytes] | Iterator[bytes]:
        """A streaming request body of this kind."""

        async def streamed_async() -> AsyncIterator[bytes]:
            for part in parts:
                yield part

        def streamed() -> Iterator[bytes]:
            yield from parts

        return streamed_async() if self.is_async else streamed()

    async def read(self, request: httpx.Request) -> bytes:
        """Read a request's streaming body into memory."""
        return await request.aread() if self.is_async else request.read()

    @contextlib.asynccontextmanager
    async def client(
        self,
        transport: httpx.AsyncBaseTransport | httpx.BaseTransport,
        base_url: str = "http://api.test",
        **options: Any,
    ) -> AsyncIterator[Client]:
        """A client of this kind on *transport*, closed (with the transport) on leaving."""
        if self.is_async:
            assert isinstance(transport, httpx.AsyncBaseTransport)
            async with httpx.AsyncClient(transport=transport, base_url=base_url, **options) as http:
                yield Client(http)
        else:
            assert isinstance(transport, httpx.BaseTransport)
            with httpx.Client(transport=transport, base_url=base_url, **options) as sync_http:
                yield Client(sync_http)

    def __repr__(self) -> str:
        return "async" if self.is_async else "sync"


@pytest.fixture(params=[True, False], ids=["async", "sync"])
def via(request: pytest.FixtureRequest) -> Via:
    """Each transport in turn: the test runs through both."""
    return Via(is_async=request.param)
