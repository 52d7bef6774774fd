"""The backend over each way redis-py reaches Redis: TLS, a unix socket, an ACL user, and
connections Sentinel provides.

On each, the backend's own connection is made like the client's: scripts run, a call
after a restart reconnects and runs once, and what the server refuses (a key an ACL user
may not touch, a wrong password, a certificate not trusted) is a backend failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest
import redis.asyncio
import redis.exceptions
from redis.asyncio.sentinel import Sentinel

from resilient import RateLimiter, RedisBackend, SlidingWindow
from resilient.events import BackendFailed, Event
from resilient.testing import RedisSentinel, RedisServer

pytestmark = pytest.mark.redis

# A master sends its first full copy to a replica at once (not after the default 5 s).
SYNC_AT_ONCE = ("--repl-diskless-sync-delay", "0")

USER, PASSWORD = "shop", "s3cret-pass"


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    """A server listening on TCP, TLS and a unix socket, with an ACL user for ``shop:*``."""
    with RedisServer(tls=True, unix_socket=True) as server:
        yield server


def clients(server: RedisServer) -> dict[str, Callable[[], redis.asyncio.Redis]]:
    return {
        "tls": lambda: redis.asyncio.Redis.from_url(server.tls_url, ssl_ca_certs=server.ca_file),
        "unix socket": lambda: redis.asyncio.Redis(unix_socket_path=server.unix_socket),
        "acl user": lambda: redis.asyncio.Redis(port=server.port, username=USER, password=PASSWORD),
    }


@pytest.fixture
async def ready(server: RedisServer) -> RedisServer:
    """The module's server, running, empty, with its ACL user."""
    server.start()
    admin = redis.asyncio.Redis.from_url(server.url)
    await admin.flushall()
    await admin.aclose()
    server.add_user(USER, PASSWORD, "~shop:*", "+@all")
    return server


@pytest.mark.parametrize("transport", ["tls", "unix socket", "acl user"])
async def test_scripts_run_and_a_restart_costs_no_call(ready: RedisServer, transport: str) -> None:
    client = clients(ready)[transport]()
    events: list[Event] = []
    async with RedisBackend(client, prefix="shop") as backend:
        limiter = RateLimiter(backend, observer=events.append)
        policy = SlidingWindow("20/hour")
        assert (await limiter.hit("k", policy)).remaining == 19
        assert (await limiter.hit("k", policy)).remaining == 18
        await asyncio.to_thread(ready.restart)  # empty, without its ACL user
        ready.add_user(USER, PASSWORD, "~shop:*", "+@all")

        decision = await limiter.hit("k", policy)

    await client.aclose()
    admin = redis.asyncio.Redis.from_url(ready.url)
    stats = await admin.info("commandstats")
    await admin.aclose()
    assert events == []
    assert not decision.degraded
    assert decision.remaining == 19  # the restarted server forgot the first hits
    # Once: EVALSHA, answered NOSCRIPT by the new server, then EVAL, which loads it.
    assert stats["cmdstat_evalsha"]["calls"] == 1
    assert stats["cmdstat_eval"]["calls"] == 1


async def test_keys_an_acl_user_may_not_touch_fail_into_the_policy(ready: RedisServer) -> None:
    client = clients(ready)["acl user"]()
    events: list[Event] = []
    async with RedisBackend(client, prefix="other") as backend:
        limiter = RateLimiter(backend, observer=events.append)
        decision = await limiter.hit("k", SlidingWindow("20/hour"))
    await client.aclose()
    assert decision.degraded
    [event] = events
    assert isinstance(event, BackendFailed)
    assert isinstance(event.error.__cause__, redis.exceptions.NoPermissionError)


@pytest.mark.parametrize(
    ("make", "cause"),
    [
        (
            lambda s: redis.asyncio.Redis(port=s.port, username=USER, password="wrong"),
            redis.exceptions.AuthenticationError,
        ),
        (  # the server's certificate is signed by a CA the client does not trust
            lambda s: redis.asyncio.Redis.from_url(s.tls_url),
            redis.exceptions.ConnectionError,
        ),
    ],
    ids=["wrong password", "untrusted certificate"],
)
async def test_a_connection_the_server_refuses_fails_into_the_policy(
    ready: RedisServer,
    make: Callable[[RedisServer], redis.asyncio.Redis],
    cause: type[Exception],
) -> None:
    client = make(ready)
    events: list[Event] = []
    async with RedisBackend(client, prefix="shop") as backend:
        limiter = RateLimiter(backend, on_backend_error="open", observer=events.append)
        decision = await limiter.hit("k", SlidingWindow("20/hour"))
    await client.aclose()
    assert decision.degraded
    [event] = events
    assert isinstance(event, BackendFailed)
    assert isinstance(event.error.__cause__, cause), repr(event.error.__cause__)


async def test_on_sentinel_calls_follow_the_master_through_a_failover() -> None:
    # The backend's connection is Sentinel-managed like the client's: after a failover,
    # it finds the new master (the call that meets the demoted one fails, and ran nowhere).
    with (
        RedisServer(args=SYNC_AT_ONCE) as master,
        RedisServer(args=("--replicaof", master.host, str(master.port))) as replica,
        RedisSentinel(master) as sentinel,
    ):
        sentinels = Sentinel([sentinel.address])
        client = sentinels.master_for(sentinel.service_name)
        events: list[Event] = []
        async with RedisBackend(client) as backend:
            limiter = RateLimiter(backend, observer=events.append)
            policy = SlidingWindow("100/hour")
            assert (await limiter.hit("k", policy)).remaining == 99
            assert (await limiter.hit("k", policy)).remaining == 98
            assert await client.wait(1, 5000) == 1  # the replica has both hits
            assert await asyncio.to_thread(sentinel.failover) == (replica.host, replica.port)

            decisions = [await limiter.hit("k", policy) for _ in range(3)]
        await client.aclose()
        for asked in sentinels.sentinels:
            await asked.aclose()
    served = [d for d in decisions if not d.degraded]
    assert served, events
    assert len(events) == len(decisions) - len(served) <= 1
    # Each call that was served ran once, on the new master (a replica refuses scripts
    # that write), after the two hits it had from the old one.
    assert [d.remaining for d in served] == list(range(97, 97 - len(served), -1))
