"""The backend's own connection, and what it makes of redis-py's failures.

An idle backend writes a call before its task first waits; a connection the peer reset
while idle is replaced before sending; commands are encoded as the client encodes them;
what redis-py raises when Redis or the connection fails becomes a ``BackendError``, and a
defect escapes as itself.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import os
import re
import time
from collections.abc import Callable, Coroutine, Generator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis.asyncio
import redis.exceptions
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from resilient import BackendError, RateLimiter, RedisBackend, SlidingWindow, TokenBucket
from resilient.backends._redispy import pack, transport_leak
from resilient.events import BackendFailed, Event
from resilient.testing import RedisCluster, RedisServer
from tests.backends.proxy import ReplyLosingProxy

pytestmark = pytest.mark.redis

_T = TypeVar("_T")
SRC = Path(__file__).resolve().parents[2] / "src" / "resilient"


class FirstStep(collections.abc.Coroutine[Any, Any, _T]):
    """*call*, as a task drives it, running *check* when it first waits (in that step)."""

    def __init__(self, call: Coroutine[Any, Any, _T], check: Callable[[], bool]) -> None:
        self._call = call
        self._check = check
        self.checked: bool | None = None

    def send(self, value: Any) -> Any:
        awaited = self._call.send(value)
        if self.checked is None:
            self.checked = self._check()
        return awaited

    def throw(self, *args: Any) -> Any:
        return self._call.throw(*args)

    def close(self) -> None:
        self._call.close()

    def __await__(self) -> Generator[Any, None, _T]:
        return self._call.__await__()


async def test_an_idle_backend_writes_a_call_before_its_task_first_waits(
    redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> None:
    # No task, no turn of the event loop between the caller and the write: when the
    # call's task first waits, its command is already on its way to Redis.
    async with RedisBackend(redis_client) as backend:
        limiter = RateLimiter(backend)
        policy = TokenBucket("10/second")
        assert (await limiter.hit("warm-up", policy)).allowed  # connected, script loaded

        def written() -> bool:  # blocks the event loop: only Redis can make progress
            with redis.Redis.from_url(redis_server.url) as admin:
                for _ in range(50):
                    if list(admin.scan_iter("resilient:rl:{k}:*")):
                        return True
                    time.sleep(0.01)
            return False

        call = FirstStep(limiter.hit("k", policy), written)
        decision = await asyncio.ensure_future(call)
    assert call.checked, "the call waited before writing its command"
    assert decision.allowed
    assert decision.remaining == 9


async def test_a_connection_reset_while_idle_is_replaced_before_the_call(
    redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> None:
    events: list[Event] = []
    async with ReplyLosingProxy(redis_server.port) as proxy:
        client = redis.asyncio.Redis(host="127.0.0.1", port=proxy.port)
        async with RedisBackend(client) as backend:
            limiter = RateLimiter(backend, observer=events.append)
            policy = SlidingWindow("20/hour")
            assert (await limiter.hit("k", policy)).remaining == 19
            assert proxy.reset_clients() == 1
            await asyncio.sleep(0.05)  # the event loop learns of the reset

            decision = await limiter.hit("k", policy)

        await client.aclose()
    assert events == []
    assert not decision.degraded
    assert decision.remaining == 18  # sent once, on a new connection
    assert proxy.connections == 2


async def test_keys_are_encoded_as_the_client_encodes_them(redis_server: RedisServer) -> None:
    # A script's keys and the client's own commands (a reset's DEL) must name the same
    # bytes: both are encoded with the client's encoding.
    client = redis.asyncio.Redis.from_url(redis_server.url, encoding="latin-1")
    await client.flushall()
    async with RedisBackend(client) as backend:
        limiter = RateLimiter(backend)
        policy = SlidingWindow("5/hour")
        assert (await limiter.hit("café", policy)).remaining == 4
        [key] = [key async for key in client.scan_iter("*")]
        assert "{café}".encode("latin-1") in key
        await limiter.reset("café", policy)
        assert [key async for key in client.scan_iter("*")] == []
    await client.aclose()


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_commands_are_packed_as_redis_py_packs_them(encoding: str) -> None:
    args = ("EVALSHA", "a" * 40, 2, "rl:{café}:tb", b"\x00\xff", -17, "x" * 7000, "")
    packed = redis.asyncio.Connection(encoding=encoding).pack_command(*args)
    assert pack(args, encoding) == b"".join(packed)


async def test_the_backend_translates_what_redis_py_raises(
    redis_client: redis.asyncio.Redis,
) -> None:
    async with RedisBackend(redis_client) as backend:
        assert set(backend.errors) == {
            redis.exceptions.RedisError,
            redis.exceptions.RedisClusterException,
            OSError,
        }
        unknown = redis_client.execute_command("NO-SUCH-COMMAND")  # type: ignore[no-untyped-call]
        with pytest.raises(BackendError, match="Redis failed counting") as raised:
            await backend.guard("counting", unknown)
        assert isinstance(raised.value.__cause__, redis.exceptions.ResponseError)

        async def hung() -> None:
            raise TimeoutError

        with pytest.raises(BackendError, match="Redis timed out waiting"):
            await backend.guard("waiting", hung())


async def test_a_defect_escapes_as_itself_and_cancellation_is_no_failure(
    redis_client: redis.asyncio.Redis,
) -> None:
    # Only what redis-py raises (and asyncio's transports leak, below) is a failure of
    # Redis: a bug of ours must not hide behind a block's failure policy.
    async def defect() -> None:
        msg = "'NoneType' object has no attribute 'writelines'"
        raise AttributeError(msg)

    async def cancelled() -> None:
        raise asyncio.CancelledError

    async with RedisBackend(redis_client) as backend:
        with pytest.raises(AttributeError, match="writelines"):
            await backend.guard("writing", defect())
        with pytest.raises(asyncio.CancelledError):
            await backend.guard("waiting", cancelled())


@pytest.mark.cluster
@pytest.mark.usefixtures("cluster_nodes_collected")
async def test_on_a_cluster_an_idle_connection_reset_fails_one_call_into_the_policy(
    redis_cluster: RedisCluster, cluster_client: AsyncRedisCluster
) -> None:
    # The cluster client writes on a kept connection without checking it first: the call
    # fails (on Python 3.12, 3.13.0-3.13.9 and 3.14.0, redis-py before its fix of #4287
    # lets asyncio's AttributeError or TypeError out), which is a backend failure, once.
    async with contextlib.AsyncExitStack() as stack:
        proxies = {
            port: await stack.enter_async_context(ReplyLosingProxy(port))
            for _, port in redis_cluster.nodes
        }
        remap = {
            (host, port): ("127.0.0.1", proxies[port].port) for host, port in redis_cluster.nodes
        }
        client = AsyncRedisCluster(
            host="127.0.0.1",
            port=proxies[redis_cluster.nodes[0][1]].port,
            address_remap=lambda a: remap.get(a, a),
        )
        stack.push_async_callback(client.aclose)
        backend = await stack.enter_async_context(RedisBackend(client))
        events: list[Event] = []
        limiter = RateLimiter(backend, observer=events.append)
        policy = SlidingWindow("20/hour")
        assert (await limiter.hit("k", policy)).remaining == 19
        node = client.get_node_from_key("{k}")
        assert node is not None
        [proxy] = [p for p in proxies.values() if p.port == node.port]
        assert proxy.reset_clients() >= 1
        await asyncio.sleep(0.05)  # the event loop learns of the reset

        failed = await limiter.hit("k", policy)
        later = [await limiter.hit("k", policy) for _ in range(3)]

    assert failed.degraded
    [event] = events
    assert isinstance(event, BackendFailed)
    cause = event.error.__cause__
    if os.environ.get("RESILIENT_EXPECT_TRANSPORT_LEAK"):  # set where #4287 reproduces
        assert transport_leak(cause), repr(cause)  # type: ignore[arg-type]
    else:
        assert isinstance(cause, redis.exceptions.ConnectionError), repr(cause)
    assert not any(d.degraded for d in later)
    assert [d.remaining for d in later] == [18, 17, 16]  # the failed call never ran


def test_only_the_fenced_module_goes_below_redis_pys_clients() -> None:
    below = re.compile(
        r"\.(connection_class|connection_kwargs|send_packed_command|send_command|"
        r"read_response|can_read|can_read_destructive|_reader|_writer|_parser)\b"
    )
    found = [
        f"{path.relative_to(SRC)}:{n}"
        for path in sorted(SRC.rglob("*.py"))
        if path.name != "_redispy.py"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if below.search(line)
    ]
    assert found == []
    fenced = (SRC / "backends" / "_redispy.py").read_text(encoding="utf-8").splitlines()
    unmarked = [line for line in fenced if below.search(line) and "# fenced: " not in line]
    assert unmarked == []


async def test_a_misused_transport_is_a_defect_not_a_dead_connection(
    redis_server: RedisServer,
) -> None:
    # An error asyncio's transport raises on a live connection (here a str where bytes
    # belong) is no leak of a dead one: it must escape, not feed a failure policy.
    _, writer = await asyncio.open_connection(redis_server.host, redis_server.port)
    try:
        with pytest.raises(TypeError) as raised:
            writer.transport.write("PING\r\n")  # type: ignore[arg-type]
    finally:
        writer.close()
        await writer.wait_closed()
    assert not transport_leak(raised.value)
    assert not transport_leak(AttributeError("'NoneType' object has no attribute 'feed'"))
