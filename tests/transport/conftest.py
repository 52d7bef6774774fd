"""A real upstream server on a loopback port, and transports that count responses."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import uvicorn

from resilient._asgi import Receive, Scope, Send
from resilient.testing import FakeClock
from tests.retry.conftest import AsyncSleeper, Recorder, Sleeper


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


class _CountedAsyncStream(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream, counter: ResponseCounter) -> None:
        self.stream = stream
        self.counter = counter

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.stream:
            yield chunk

    async def aclose(self) -> None:
        self.counter.closed += 1
        await self.stream.aclose()


class _CountedSyncStream(httpx.SyncByteStream):
    def __init__(self, stream: httpx.SyncByteStream, counter: ResponseCounter) -> None:
        self.stream = stream
        self.counter = counter

    def __iter__(self) -> Iterator[bytes]:
        yield from self.stream

    def close(self) -> None:
        self.counter.closed += 1
        self.stream.close()


class ResponseCounter:
    """Counts the responses a wrapped transport returns, and how many of them were closed."""

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0

    @property
    def open(self) -> int:
        return self.opened - self.closed


class CountingTransport(httpx.AsyncBaseTransport, ResponseCounter):
    """Wraps an async transport; counts the responses it returns and those closed."""

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        ResponseCounter.__init__(self)
        self.transport = transport

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.transport.handle_async_request(request)
        self.opened += 1
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_CountedAsyncStream(response.stream, self),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self.transport.aclose()


class SyncCountingTransport(httpx.BaseTransport, ResponseCounter):
    """The sync twin of :class:`CountingTransport`."""

    def __init__(self, transport: httpx.BaseTransport) -> None:
        ResponseCounter.__init__(self)
        self.transport = transport

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.transport.handle_request(request)
        self.opened += 1
        assert isinstance(response.stream, httpx.SyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_CountedSyncStream(response.stream, self),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self.transport.close()


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
def sleeper(clock: FakeClock) -> Sleeper:
    return Sleeper(clock)


@pytest.fixture
def async_sleeper(clock: FakeClock) -> AsyncSleeper:
    return AsyncSleeper(clock)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()
