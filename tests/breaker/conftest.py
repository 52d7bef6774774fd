"""One set of breaker behaviour tests, run through the sync and the async driver."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from resilient.breaker import CircuitBreaker


class Via:
    """Calls through a breaker the sync way (``def``, ``with``) or the async way.

    Every helper is awaitable, so a test reads the same either way: ``guard`` decorates a
    plain function as a ``def`` or as an ``async def``, ``call`` is ``breaker.call``,
    ``block`` is ``with breaker`` or ``async with breaker``, and ``enter``/``exit`` are the
    two halves of that block, for tests that interleave blocks.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __repr__(self) -> str:
        return self.kind

    def guard(self, breaker: CircuitBreaker, function: Callable[..., Any]) -> Callable[..., Any]:
        """Return *function* decorated with *breaker*; its calls are awaited either way."""
        if self.kind == "sync":
            guarded = breaker(function)

            async def call_sync(*args: Any, **kwargs: Any) -> Any:
                return guarded(*args, **kwargs)

            return call_sync

        async def as_async(*args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

        guarded_async = breaker(as_async)

        async def call_async(*args: Any, **kwargs: Any) -> Any:
            return await guarded_async(*args, **kwargs)

        return call_async

    async def call(self, breaker: CircuitBreaker, function: Callable[..., Any]) -> Any:
        """``breaker.call(function)``, with *function* as a ``def`` or an ``async def``."""
        if self.kind == "sync":
            return breaker.call(function)

        async def as_async() -> Any:
            return function()

        awaitable: Awaitable[Any] = breaker.call(as_async)
        return await awaitable

    @contextlib.asynccontextmanager
    async def block(self, breaker: CircuitBreaker) -> AsyncIterator[None]:
        """``with breaker:`` or ``async with breaker:``."""
        if self.kind == "sync":
            with breaker:
                yield
        else:
            async with breaker:
                yield

    async def enter(self, breaker: CircuitBreaker) -> None:
        """The first half of :meth:`block`."""
        if self.kind == "sync":
            breaker.__enter__()
        else:
            await breaker.__aenter__()

    async def exit(self, breaker: CircuitBreaker, exc: BaseException | None = None) -> None:
        """The second half of :meth:`block`: it ended with *exc*, or returned."""
        if self.kind == "sync":
            breaker.__exit__(type(exc) if exc else None, exc, None)
        else:
            await breaker.__aexit__(type(exc) if exc else None, exc, None)


@pytest.fixture(params=["sync", "async"])
def via(request: pytest.FixtureRequest) -> Via:
    """The sync driver, then the async driver."""
    return Via(request.param)
