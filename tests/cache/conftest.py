"""The cache's two drivers, behind one interface, so each behaviour is tested through both.

``driver.get_or_load(cache, key, loader)`` is ``await cache.get_or_load(...)`` for the
asyncio driver, and ``cache.get_or_load_sync(...)`` in a thread of a pool of the test's
own for the thread driver: concurrent calls (``asyncio.gather``) are concurrent tasks for
one and concurrent threads for the other. A loader is a :class:`Loader`, which has both
forms, or a plain function, which the asyncio driver wraps.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from resilient.cache import Cache, cached
from resilient.testing import FakeClock


async def until(condition: Callable[[], bool], *, seconds: float = 10.0) -> None:
    """Wait for another task or thread to get somewhere: bounded, not a timing assertion."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("the condition never held")
        await asyncio.sleep(0.001)


class Gate:
    """Holds loaders until opened (from the test's loop): tasks await it, threads block."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._opened = asyncio.Event()

    def set(self) -> None:
        self._open.set()
        self._opened.set()

    async def wait(self) -> None:
        await self._opened.wait()

    def wait_sync(self) -> None:
        if not self._open.wait(30):
            raise AssertionError("the gate was never opened")


class Loader:
    """A loader that counts its calls, can fail, and can be held at a gate."""

    def __init__(self, clock: FakeClock | None = None, compute: float = 0.0) -> None:
        self.calls = 0
        self.fail: Exception | None = None
        self.gate: Gate | None = None
        self.clock = clock
        self.compute = compute
        self._lock = threading.Lock()

    def _start(self) -> int:
        with self._lock:
            self.calls += 1
            return self.calls

    def _finish(self, call: int) -> dict[str, int]:
        if self.clock is not None:
            self.clock.advance(self.compute)  # the time the value takes to compute
        if self.fail is not None:
            raise self.fail
        return {"version": call}

    async def __call__(self) -> dict[str, int]:
        call = self._start()
        if self.gate is not None:
            await self.gate.wait()
        return self._finish(call)

    def sync(self) -> dict[str, int]:
        call = self._start()
        if self.gate is not None:
            self.gate.wait_sync()
        return self._finish(call)


class Driver:
    """How a test calls the cache: ``get_or_load`` on the loop, or the sync form in threads."""

    name = "async"

    async def get_or_load(
        self, cache: Cache, key: str, loader: Loader | Callable[[], Any], **options: Any
    ) -> Any:
        if isinstance(loader, Loader):
            return await cache.get_or_load(key, loader, **options)
        function = loader

        async def call() -> Any:
            return function()

        return await cache.get_or_load(key, call, **options)

    def cached(
        self, cache: Cache, **options: Any
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Return ``@cached(cache, **options)`` for a plain function, called with await."""

        def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(function)
            async def as_async(*args: Any, **kwargs: Any) -> Any:
                return function(*args, **kwargs)

            return cached(cache, **options)(as_async)

        return decorate

    async def settle(self, cache: Cache) -> None:
        """Wait until the cache has no load in flight (background refreshes landed)."""
        await until(lambda: cache.in_flight == 0)


class ThreadDriver(Driver):
    """``get_or_load_sync`` in threads of a pool, so concurrent calls are threads."""

    name = "sync"

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self.pool = pool

    async def _in_thread(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(function, *args, **kwargs))

    async def get_or_load(
        self, cache: Cache, key: str, loader: Loader | Callable[[], Any], **options: Any
    ) -> Any:
        function = loader.sync if isinstance(loader, Loader) else loader
        return await self._in_thread(cache.get_or_load_sync, key, function, **options)

    def cached(
        self, cache: Cache, **options: Any
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
            assert not inspect.iscoroutinefunction(function)
            decorated = cached(cache, **options)(function)

            async def in_thread(*args: Any, **kwargs: Any) -> Any:
                return await self._in_thread(decorated, *args, **kwargs)

            return in_thread

        return decorate


@pytest.fixture(scope="session")
def thread_pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=64, thread_name_prefix="test-caller") as pool:
        yield pool


@pytest.fixture(params=["async", "sync"])
def driver(request: pytest.FixtureRequest, thread_pool: ThreadPoolExecutor) -> Driver:
    """Each test that takes it runs twice: through ``get_or_load`` and ``get_or_load_sync``."""
    return Driver() if request.param == "async" else ThreadDriver(thread_pool)
