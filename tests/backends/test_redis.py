"""The Redis backend's own connection: a command whose reply may be lost is never resent.

Redis runs a script as soon as its bytes arrive; a connection that breaks afterwards loses
only the reply. Sending the command again would run the script twice (a rate-limit hit
charged twice, a claim that finds itself in progress), so the failure goes to the block's
policy instead. A connection found stale before sending (Redis restarted, or closed it
while idle) is replaced first, and the command sent once, without an error.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from resilient import (
    BackendError,
    IdempotencyMiddleware,
    RateLimiter,
    RedisBackend,
    SlidingWindow,
)
from resilient.events import BackendFailed, Event
from resilient.idempotency.core import ClaimStatus
from resilient.idempotency.redis import RedisIdempotencyStore
from resilient.testing import FakeClock, RedisCluster, RedisServer
from tests.backends.proxy import ReplyLosingProxy

pytestmark = pytest.mark.redis


@pytest.fixture
async def proxy(
    redis_client: redis.asyncio.Redis, redis_server: RedisServer
) -> AsyncIterator[ReplyLosingProxy]:
    """A proxy to the session's (flushed) server."""
    async with ReplyLosingProxy(redis_server.port) as proxy:
        yield proxy


@pytest.fixture
async def proxied(proxy: ReplyLosingProxy) -> AsyncIterator[RedisBackend]:
    """A backend whose client reaches Redis through the proxy."""
    client = redis.asyncio.Redis(host="127.0.0.1", port=proxy.port)
    async with RedisBackend(client) as backend:
        yield backend
    await client.aclose()


async def test_a_hit_whose_reply_is_lost_is_charged_once_and_reported(
    proxy: ReplyLosingProxy, proxied: RedisBackend
) -> None:
    events: list[Event] = []
    limiter = RateLimiter(proxied, observer=events.append)
    policy = SlidingWindow("20/hour")
    assert (await limiter.hit("warm-up", policy)).allowed  # the connection is now reused
    proxy.lose_next_reply()

    lost = await limiter.hit("k", policy)

    assert proxy.replies_lost == 1
    assert lost.degraded  # the block's policy ("open") answered, not Redis
    assert lost.allowed
    [event] = events
    assert isinstance(event, BackendFailed)
    assert event.outcome == "admitted"
    # Redis ran the script once: the next hit sees a count of 1.
    assert (await limiter.peek("k", policy)).remaining == 19
    assert (await limiter.hit("k", policy)).remaining == 18


async def test_a_claim_whose_reply_is_lost_fails_and_its_lease_expires(
    proxy: ReplyLosingProxy, proxied: RedisBackend
) -> None:
    store = RedisIdempotencyStore(proxied)
    assert (await store.claim("warm-up", "f", "o", 5_000, 1_000)).status is ClaimStatus.CLAIMED
    proxy.lose_next_reply()

    with pytest.raises(BackendError, match=r"claim\.lua"):
        await store.claim("k", "f", "lost-owner", 5_000, 1_000)

    # The claim ran: its owner never learnt it holds the lease, so nobody renews it. A
    # retry of the request is refused as in progress until the lease ends, then runs.
    retried = await store.claim("k", "f", "retry", 5_000, 2_000)
    assert retried.status is ClaimStatus.IN_PROGRESS
    assert retried.retry_after_ms == 4_000
    later = await store.claim("k", "f", "retry", 5_000, 6_000)
    assert later.status is ClaimStatus.CLAIMED


async def test_a_request_whose_claim_reply_is_lost_runs_once_the_lease_has_ended(
    proxy: ReplyLosingProxy, proxied: RedisBackend
) -> None:
    runs: list[str] = []

    async def order(request: Request) -> Response:
        runs.append(request.headers["idempotency-key"])
        return PlainTextResponse("created", status_code=201)

    clock = FakeClock()
    events: list[Event] = []
    shop = Starlette(routes=[Route("/orders", order, methods=["POST"])])
    app = IdempotencyMiddleware(
        shop, backend=proxied, lease=30.0, clock=clock, observer=events.append
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
        warm = await client.post("/orders", headers={"Idempotency-Key": "warm-up"})
        assert warm.status_code == 201
        proxy.lose_next_reply()

        lost = await client.post("/orders", headers={"Idempotency-Key": "k"})
        assert lost.status_code == 503  # the default policy: never run unguarded
        assert [type(e) for e in events if isinstance(e, BackendFailed)] == [BackendFailed]
        # The claim ran, with nobody to run the request or renew the lease.
        clock.advance(29)
        assert (await client.post("/orders", headers={"Idempotency-Key": "k"})).status_code == 409
        clock.advance(2)
        later = await client.post("/orders", headers={"Idempotency-Key": "k"})
        replay = await client.post("/orders", headers={"Idempotency-Key": "k"})
    assert proxy.replies_lost == 1
    assert later.status_code == replay.status_code == 201
    assert runs == ["warm-up", "k"]


async def test_after_a_restart_the_next_call_reconnects_and_runs_once(
    fresh_redis_server: RedisServer,
) -> None:
    client = redis.asyncio.Redis.from_url(fresh_redis_server.url)
    events: list[Event] = []
    async with RedisBackend(client) as backend:
        limiter = RateLimiter(backend, observer=events.append)
        policy = SlidingWindow("20/hour")
        assert (await limiter.hit("k", policy)).remaining == 19
        # Restarted while the app runs (its event loop sees the old connection close).
        await asyncio.to_thread(fresh_redis_server.restart)

        decision = await limiter.hit("k", policy)

        assert events == []
        assert not decision.degraded
        assert decision.remaining == 19  # the restarted server forgot the first hit
        stats = await client.info("commandstats")
    await client.aclose()
    # Once: EVALSHA, answered NOSCRIPT by the new server, then EVAL, which loads it.
    assert stats["cmdstat_evalsha"]["calls"] == 1
    assert stats["cmdstat_eval"]["calls"] == 1


@pytest.mark.cluster
@pytest.mark.usefixtures("cluster_nodes_collected")
async def test_on_a_cluster_a_hit_whose_reply_is_lost_is_charged_once(
    redis_cluster: RedisCluster, cluster_client: AsyncRedisCluster
) -> None:
    # redis-py's cluster client retries a command after a connection error, whether the
    # error came while sending or while reading: the backend must not let it resend.
    async with contextlib.AsyncExitStack() as stack:
        proxies = {
            port: await stack.enter_async_context(ReplyLosingProxy(port))
            for _, port in redis_cluster.nodes
        }
        remap = {
            (host, port): ("127.0.0.1", proxies[port].port) for host, port in redis_cluster.nodes
        }
        first = proxies[redis_cluster.nodes[0][1]]
        client = AsyncRedisCluster(
            host="127.0.0.1", port=first.port, address_remap=lambda a: remap.get(a, a)
        )
        stack.push_async_callback(client.aclose)
        backend = await stack.enter_async_context(RedisBackend(client))
        events: list[Event] = []
        limiter = RateLimiter(backend, observer=events.append)
        policy = SlidingWindow("20/hour")
        # Another limit on the same key: its node's connection is made and in use.
        assert (await limiter.hit("k", SlidingWindow("5/minute"))).allowed
        node = client.get_node_from_key("{k}")
        assert node is not None
        [proxy] = [p for p in proxies.values() if p.port == node.port]
        proxy.lose_next_reply()

        lost = await limiter.hit("k", policy)

        assert proxy.replies_lost == 1
        assert lost.degraded
        [event] = events
        assert isinstance(event, BackendFailed)
        assert (await limiter.peek("k", policy)).remaining == 19
        assert (await limiter.hit("k", policy)).remaining == 18


@pytest.mark.cluster
@pytest.mark.slow
async def test_on_a_cluster_calls_fail_into_the_policy_until_a_restarted_node_serves() -> None:
    # Without the client's retry, a call that meets the restarted node's closed connection,
    # then its CLUSTERDOWN while it waits to serve writes again, fails at once; none of
    # those calls ran, and calls succeed again once the node serves.
    with RedisCluster(masters=3) as cluster:
        client = AsyncRedisCluster.from_url(cluster.url)
        events: list[Event] = []
        async with RedisBackend(client) as backend:
            limiter = RateLimiter(backend, observer=events.append)
            policy = SlidingWindow("1000/hour")
            assert (await limiter.hit("k", policy)).remaining == 999
            node = client.get_node_from_key("{k}")
            assert node is not None
            [server] = [s for s in cluster.servers if s.port == node.port]
            await asyncio.to_thread(server.restart)  # without its data

            failed = 0
            for _ in range(150):  # Redis lets a restarted master serve writes after 2 s
                decision = await limiter.hit("k", policy)
                if not decision.degraded:
                    break
                failed += 1
                await asyncio.sleep(0.1)
        await client.aclose()
    assert not decision.degraded
    assert decision.remaining == 999  # the first hit went with the data, no failed call ran
    assert failed >= 1
    assert len(events) == failed
    assert all(isinstance(e, BackendFailed) for e in events)
