"""Fixtures: real Redis servers (standalone and cluster), started once per session.

A test that uses a Redis server is marked ``redis`` (``cluster`` too when it uses a Redis
Cluster) from what it uses, not by hand: a fixture that starts a server (``REDIS_FIXTURES``,
and every fixture built on one of them), or a parameter that chooses a Redis backend by name
(``REDIS_PARAMS``). ``pytest -m "not redis"`` so runs everything that needs no server.

When no ``redis-server`` can be found (see :func:`resilient.testing.find_redis_server`),
those tests skip, saying how to get one; so does a test that meets the missing binary in a
way its marks do not tell (a server started inside the code under test). With
``RESILIENT_REDIS_REQUIRED=1`` (CI sets it) they fail instead: there a missing server is a
broken set-up, not a reason to run fewer tests.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Generator, Iterator

import pytest
import redis.asyncio
from hypothesis import settings
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from resilient import RedisBackend
from resilient.testing import RecordingObserver, RedisCluster, RedisServer, find_redis_server

settings.register_profile("default", max_examples=100, deadline=None)
settings.register_profile("ci", max_examples=200, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# The fixtures that start Redis servers, and the markers a test using one (directly or
# through another fixture) gets. A new fixture that starts a server belongs here.
REDIS_FIXTURES: dict[str, tuple[str, ...]] = {
    "redis_server": ("redis",),
    "fresh_redis_server": ("redis",),
    "redis_cluster": ("redis", "cluster"),
    "redis_behind_proxy": ("redis",),  # tests/chaos
    "cluster": ("redis", "cluster"),  # tests/chaos
}
# Parametrized tests and fixtures choose their backend by name: the names of the Redis ones
# ("fresh": a server of the test's own, in the example shop's tests).
REDIS_PARAMS: dict[str, tuple[str, ...]] = {
    "redis": ("redis",),
    "fresh": ("redis",),
    "cluster": ("redis", "cluster"),
}


def _missing_redis_server() -> str | None:
    """Why no ``redis-server`` can be used, or ``None`` when one can."""
    try:
        find_redis_server()
    except RuntimeError as error:
        return str(error)
    return None


MISSING_REDIS_SERVER = _missing_redis_server()
REDIS_REQUIRED = os.environ.get("RESILIENT_REDIS_REQUIRED", "") not in ("", "0")
SKIP_REASON = f"needs a redis-server: {MISSING_REDIS_SERVER}"


def _redis_tests_skip() -> bool:
    return MISSING_REDIS_SERVER is not None and not REDIS_REQUIRED


def pytest_report_header() -> str:
    if MISSING_REDIS_SERVER is None:
        return f"redis-server: {find_redis_server()}"
    then = "the Redis tests fail" if REDIS_REQUIRED else "the Redis tests skip"
    return f"redis-server: none ({then}): {MISSING_REDIS_SERVER}"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names: set[str] = set()
        for fixture in getattr(item, "fixturenames", ()):
            names.update(REDIS_FIXTURES.get(fixture, ()))
        callspec = getattr(item, "callspec", None)
        if callspec is not None:
            for value in callspec.params.values():
                if isinstance(value, str):
                    names.update(REDIS_PARAMS.get(value, ()))
        if item.get_closest_marker("cluster") is not None:
            names.add("redis")
        for name in sorted(names):
            if item.get_closest_marker(name) is None:
                item.add_marker(name)
        if item.get_closest_marker("redis") is not None and _redis_tests_skip():
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


def _skip_without_redis_server() -> None:
    if _redis_tests_skip():
        pytest.skip(SKIP_REASON)


def _is_missing_redis_server(error: BaseException) -> bool:
    """Whether *error* is :func:`find_redis_server` failing to find the binary (alone, or
    all an exception group holds)."""
    if isinstance(error, BaseExceptionGroup):
        return all(_is_missing_redis_server(inner) for inner in error.exceptions)
    return isinstance(error, RuntimeError) and str(error) == MISSING_REDIS_SERVER


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    try:
        return (yield)
    except BaseException as error:
        if _is_missing_redis_server(error):
            _skip_without_redis_server()
        raise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    # A server started where no mark can see it: by a page of the docs that asks for one,
    # in a test's own body, by the code under test.
    try:
        return (yield)
    except BaseException as error:
        if _is_missing_redis_server(error):
            _skip_without_redis_server()
        raise


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One standalone server for the whole session (tests flush it)."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """One 3-master Redis Cluster for the whole session (tests flush it)."""
    with RedisCluster(masters=3) as cluster:
        yield cluster


@pytest.fixture
def fresh_redis_server() -> Iterator[RedisServer]:
    """A server of the test's own, for tests that stop or restart Redis."""
    with RedisServer() as server:
        yield server


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    """A client of the session's server, flushed before the test."""
    if not redis_server.is_running:  # a test may have stopped it
        redis_server.start()
    client = redis.asyncio.Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def cluster_client(redis_cluster: RedisCluster) -> AsyncIterator[AsyncRedisCluster]:
    """A cluster client, with every master flushed before the test."""
    client = AsyncRedisCluster.from_url(redis_cluster.url)
    await client.flushall(target_nodes=AsyncRedisCluster.PRIMARIES)
    yield client
    await client.aclose()


@pytest.fixture
async def two_backends(
    redis_server: RedisServer,
) -> AsyncIterator[tuple[RedisBackend, RedisBackend]]:
    """Two backends on the session's server, each with a client of its own: two instances
    of one service (the server is flushed first)."""
    if not redis_server.is_running:
        redis_server.start()
    one = redis.asyncio.Redis.from_url(redis_server.url)
    other = redis.asyncio.Redis.from_url(redis_server.url)
    await one.flushall()
    async with RedisBackend(one) as a, RedisBackend(other) as b:
        yield a, b
    await one.aclose()
    await other.aclose()


@pytest.fixture
def recorder() -> RecordingObserver:
    """An observer that keeps every event, for the test to read."""
    return RecordingObserver()
