"""The shop's readiness after Redis restarted empty: its idempotency records are gone."""

from __future__ import annotations

import os
import signal

import pytest
import redis

from resilient.testing import RedisServer
from tests.ecommerce.conftest import ShopFactory

ORDER = {"items": [{"product_id": 12, "quantity": 1}]}


@pytest.mark.parametrize("redis_url", ["fresh"], indirect=True)
async def test_orders_are_quarantined_and_readyz_says_so_after_redis_restarted_empty(
    make_shop: ShopFactory, fresh_redis_server: RedisServer
) -> None:
    harness = await make_shop()
    alice = await harness.login("alice", "wonderland")
    async with harness.client() as client:
        first = await client.post(
            "/api/orders", json=ORDER, headers={**alice, "Idempotency-Key": "before"}
        )
        with redis.Redis.from_url(fresh_redis_server.url) as admin:
            pid = int(admin.info("server")["process_id"])
        os.kill(pid, signal.SIGKILL)
        fresh_redis_server.stop()  # reaps the killed process
        fresh_redis_server.start()  # empty: the idempotency records are gone
        await client.get("/readyz")  # the shop's connections notice the restart
        refused = await client.post(
            "/api/orders", json=ORDER, headers={**alice, "Idempotency-Key": "after"}
        )
        ready = await client.get("/readyz")
        harness.clock.advance(31)  # the quarantine (one lease) is over
        again = await client.post(
            "/api/orders", json=ORDER, headers={**alice, "Idempotency-Key": "after"}
        )
        ready_again = await client.get("/readyz")
    assert first.status_code == 201
    assert refused.status_code == 503
    assert int(refused.headers["retry-after"]) == 30
    assert ready.status_code == 503
    assert ready.json()["checks"]["idempotency"].startswith("quarantined for 30 s")
    assert again.status_code == 201
    assert ready_again.status_code == 200
    assert "idempotency" not in ready_again.json()["checks"]
