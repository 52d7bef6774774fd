"""End to end: the example shop's story, on the embedded defaults, on Redis and on a Redis
Cluster."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from resilient.testing import LocalIssuer
from tests.ecommerce.conftest import Harness, ShopFactory

ALICE = ("alice", "wonderland")
BOB = ("bob", "builder")
ADMIN = ("admin", "admin-secret")
ON_REDIS = pytest.mark.parametrize("redis_url", ["redis", "cluster"], indirect=True)


def stock_of(harness: Harness, product_id: int) -> int:
    with sqlite3.connect(harness.shop.settings.database) as db:
        (stock,) = db.execute("SELECT stock FROM products WHERE id = ?", (product_id,)).fetchone()
    return int(stock)


def set_stock(harness: Harness, product_id: int, stock: int) -> None:
    with sqlite3.connect(harness.shop.settings.database) as db:
        db.execute("UPDATE products SET stock = ? WHERE id = ?", (stock, product_id))


def loads(harness: Harness, kind: str) -> float:
    value = harness.shop.registry.get_sample_value("shop_catalog_loads_total", {"kind": kind})
    return value or 0.0


def is_problem(response: httpx.Response, status: int) -> bool:
    return (
        response.status_code == status
        and response.headers["content-type"] == "application/problem+json"
        and response.json()["status"] == status
    )


# -- catalog ----------------------------------------------------------------------------


async def test_catalog_filters_and_pages(harness: Harness) -> None:
    async with harness.client() as client:
        response = await client.get(
            "/api/products",
            params={"category": "audio", "min_price": 10000, "max_price": 90000, "per_page": 7},
        )
        page = response.json()
        assert response.status_code == 200
        assert 0 < len(page["items"]) <= 7
        assert page["total"] >= len(page["items"])
        for item in page["items"]:
            assert item["category"] == "audio"
            assert 10000 <= item["price_cents"] <= 90000
        second = (
            await client.get(
                "/api/products",
                params={
                    "category": "audio",
                    "min_price": 10000,
                    "max_price": 90000,
                    "per_page": 7,
                    "page": 2,
                },
            )
        ).json()
        assert {i["id"] for i in second["items"]}.isdisjoint({i["id"] for i in page["items"]})
        text = (await client.get("/api/products", params={"q": "Tent"})).json()
        assert text["items"]
        assert all("Tent" in item["name"] for item in text["items"])


@pytest.mark.parametrize(
    "params",
    [
        {"category": "spaceships"},
        {"page": "0"},
        {"per_page": "1000"},
        {"min_price": "-1"},
        {"min_price": "500", "max_price": "100"},
        {"q": "x" * 101},
        {"sort": "price"},
    ],
)
async def test_bad_catalog_queries_get_a_400_problem(
    harness: Harness, params: dict[str, str]
) -> None:
    async with harness.client() as client:
        response = await client.get("/api/products", params=params)
    assert is_problem(response, 400)


async def test_a_missing_product_is_a_404_problem(harness: Harness) -> None:
    async with harness.client() as client:
        assert is_problem(await client.get("/api/products/999999"), 404)
        assert is_problem(await client.get("/api/nowhere"), 404)


async def crowd(
    harnesses: list[Harness], n: int, path: str, params: dict[str, str] | None = None
) -> list[httpx.Response]:
    """*n* concurrent GETs, each from a client of its own address (no rate limit in sight),
    spread over *harnesses*."""

    async def get(i: int) -> httpx.Response:
        async with harnesses[i % len(harnesses)].client(ip=f"10.9.{i // 250}.{i % 250}") as c:
            return await c.get(path, params=params)

    return await asyncio.gather(*(get(i) for i in range(n)))


async def test_a_cold_catalog_page_is_loaded_once_for_a_crowd(harness: Harness) -> None:
    responses = await crowd([harness], 100, "/api/products", {"category": "books"})
    items = await crowd([harness], 100, "/api/products/42")
    assert {r.status_code for r in responses} == {200}
    assert len({r.content for r in responses}) == 1
    assert {r.status_code for r in items} == {200}
    assert loads(harness, "list") == 1
    assert loads(harness, "item") == 1


@ON_REDIS  # instances share a catalog load only through Redis
async def test_a_crowd_on_two_instances_loads_once_with_redis(make_shop: ShopFactory) -> None:
    one, other = await make_shop(), await make_shop()
    responses = await crowd([one, other], 100, "/api/products", {"brand": "Acme"})
    assert {r.status_code for r in responses} == {200}
    assert loads(one, "list") + loads(other, "list") == 1


# -- login ------------------------------------------------------------------------------


async def test_login_returns_a_token_the_shop_accepts(harness: Harness) -> None:
    headers = await harness.login(*ALICE)
    claims = jwt.decode(headers["Authorization"][7:], options={"verify_signature": False})
    assert claims["username"] == "alice"
    async with harness.client() as client:
        response = await client.get(f"/api/users/{claims['sub']}/orders", headers=headers)
    assert response.status_code == 200
    assert response.json() == {"orders": []}


async def test_brute_force_on_one_account_is_blocked(harness: Harness) -> None:
    statuses = []
    # From many addresses: the per-username limit holds whatever the IP.
    for attempt in range(6):
        async with harness.client(ip=f"192.0.2.{attempt + 1}") as client:
            response = await client.post(
                "/api/login", json={"username": "alice", "password": f"guess-{attempt}"}
            )
        statuses.append(response.status_code)
    assert statuses == [401] * 5 + [429]
    async with harness.client(ip="192.0.2.99") as client:
        right = await client.post("/api/login", json={"username": "alice", "password": ALICE[1]})
    assert is_problem(right, 429)  # blocked: even the right password waits
    assert 0 < int(right.headers["retry-after"]) <= 900
    harness.clock.advance(901)
    async with harness.client(ip="192.0.2.99") as client:
        later = await client.post("/api/login", json={"username": "alice", "password": ALICE[1]})
    assert later.status_code == 200


async def test_one_address_guessing_many_accounts_is_blocked(harness: Harness) -> None:
    statuses = []
    async with harness.client(ip="192.0.2.200") as client:
        for n in range(21):
            response = await client.post(
                "/api/login", json={"username": f"user{n}", "password": "x"}
            )
            statuses.append(response.status_code)
    assert statuses[:20] == [401] * 20
    assert statuses[20] == 429
    assert "ratelimit" in {name.lower() for name in response.headers}


@pytest.mark.parametrize(
    "body", [b"not json", b"[]", b'{"username": 1, "password": "x"}', b'{"username": ""}']
)
async def test_malformed_logins_get_a_problem(harness: Harness, body: bytes) -> None:
    async with harness.client() as client:
        response = await client.post("/api/login", content=body)
    assert response.status_code in {400, 422}
    assert is_problem(response, response.status_code)


# -- tokens -----------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def test_forged_expired_and_unsigned_tokens_are_refused(harness: Harness) -> None:
    token = (await harness.login(*BOB))["Authorization"][7:]
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    tampered = _b64(json.dumps({**claims, "roles": ["admin"]}).encode())
    other_key = ec.generate_private_key(ec.SECP256R1())
    kid = jwt.get_unverified_header(token)["kid"]
    unsigned = _b64(b'{"alg":"none","typ":"at+jwt"}')
    forged = {
        "tampered": f"{header}.{tampered}.{signature}",
        "other key": jwt.encode(claims, other_key, "ES256", headers={"kid": kid, "typ": "at+jwt"}),
        "alg none": f"{unsigned}.{payload}.",
        "garbage": "abc.def.ghi",
    }
    async with harness.client() as client:
        for name, bad in forged.items():
            response = await client.get(
                "/api/products/1", headers={"Authorization": f"Bearer {bad}"}
            )
            assert is_problem(response, 401), name
            assert response.headers["www-authenticate"].startswith("Bearer"), name
        harness.clock.advance(harness.shop.settings.token_lifetime + 60)
        expired = await client.get("/api/products/1", headers={"Authorization": f"Bearer {token}"})
    assert is_problem(expired, 401)
    assert "expired" in expired.headers["www-authenticate"]


# -- admin ------------------------------------------------------------------------------


async def test_only_an_admin_updates_a_product_and_the_cache_follows(harness: Harness) -> None:
    async with harness.client() as client:
        before = (await client.get("/api/products/7")).json()
        listed = (await client.get("/api/products", params={"per_page": 10})).json()
        assert before in listed["items"]
        anonymous = await client.put("/api/products/7", json={"price_cents": 1})
        assert is_problem(anonymous, 401)
        bob = await client.put(
            "/api/products/7", json={"price_cents": 1}, headers=await harness.login(*BOB)
        )
        assert is_problem(bob, 403)
        admin = await harness.login(*ADMIN)
        updated = await client.put("/api/products/7", json={"price_cents": 1}, headers=admin)
        assert updated.status_code == 200
        assert updated.json()["price_cents"] == 1
        after = (await client.get("/api/products/7")).json()
        relisted = (await client.get("/api/products", params={"per_page": 10})).json()
        for bad in [{"sku": "X"}, {"price_cents": -5}, {"price_cents": True}, {}, {"name": ""}]:
            response = await client.put("/api/products/7", json=bad, headers=admin)
            assert is_problem(response, 422), bad
        assert is_problem(
            await client.put("/api/products/999999", json={"stock": 1}, headers=admin), 404
        )
    assert before["price_cents"] != 1
    assert after["price_cents"] == 1
    assert {**before, "price_cents": 1} in relisted["items"]


# -- orders -----------------------------------------------------------------------------


async def test_orders_need_a_token_and_an_idempotency_key(harness: Harness) -> None:
    order = {"items": [{"product_id": 1, "quantity": 1}]}
    async with harness.client() as client:
        anonymous = await client.post("/api/orders", json=order, headers={"Idempotency-Key": "k"})
        assert is_problem(anonymous, 401)
        keyless = await client.post("/api/orders", json=order, headers=await harness.login(*BOB))
        assert is_problem(keyless, 400)


async def test_a_double_submitted_order_is_placed_once(harness: Harness) -> None:
    set_stock(harness, 5, 10)
    headers = {**(await harness.login(*ALICE)), "Idempotency-Key": "checkout-1"}
    order = {"items": [{"product_id": 5, "quantity": 2}]}
    async with harness.client() as client:
        first = await client.post("/api/orders", json=order, headers=headers)
        again = await client.post("/api/orders", json=order, headers=headers)
        changed = await client.post(
            "/api/orders", json={"items": [{"product_id": 5, "quantity": 3}]}, headers=headers
        )
        user = first.json()["user_id"]
        mine = (await client.get(f"/api/users/{user}/orders", headers=headers)).json()
    assert first.status_code == 201
    assert first.json()["status"] == "paid"
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert is_problem(changed, 422)
    assert [o["id"] for o in mine["orders"]] == [first.json()["id"]]
    assert stock_of(harness, 5) == 8
    assert len(harness.provider.charges) == 1


async def test_concurrent_orders_never_oversell(make_shop: ShopFactory) -> None:
    one, other = await make_shop(), await make_shop()
    set_stock(one, 11, 3)
    tokens = [await one.login(f"customer{n:03d}", f"password-{n}") for n in range(1, 11)]

    async def buy(n: int) -> int:
        harness = one if n % 2 else other
        async with harness.client() as client:
            response = await client.post(
                "/api/orders",
                json={"items": [{"product_id": 11, "quantity": 1}]},
                headers={**tokens[n], "Idempotency-Key": f"buy-{n}"},
            )
        return response.status_code

    statuses = await asyncio.gather(*(buy(n) for n in range(10)))
    assert sorted(statuses) == [201] * 3 + [409] * 7
    assert stock_of(one, 11) == 0


async def test_an_order_for_too_much_changes_nothing(harness: Harness) -> None:
    set_stock(harness, 3, 1)
    set_stock(harness, 4, 5)
    headers = {**(await harness.login(*ALICE)), "Idempotency-Key": "greedy"}
    order = {"items": [{"product_id": 4, "quantity": 2}, {"product_id": 3, "quantity": 2}]}
    async with harness.client() as client:
        response = await client.post("/api/orders", json=order, headers=headers)
    assert is_problem(response, 409)
    assert response.json()["product_id"] == 3
    assert (stock_of(harness, 3), stock_of(harness, 4)) == (1, 5)


@pytest.mark.parametrize(
    "order",
    [
        {},
        {"items": []},
        {"items": [{"product_id": "1"}]},
        {"items": [{"product_id": 1, "quantity": 0}]},
        {"items": [{"product_id": 1, "quantity": 101}]},
        {"items": [{"product_id": 999999}]},
        {"items": [{"product_id": 1}] * 21},
    ],
)
async def test_malformed_orders_get_a_422(harness: Harness, order: object) -> None:
    headers = {**(await harness.login(*BOB)), "Idempotency-Key": "bad"}
    async with harness.client() as client:
        response = await client.post("/api/orders", json=order, headers=headers)
    assert is_problem(response, 422), response.headers


async def test_a_payment_outage_fails_fast_then_recovers(harness: Harness) -> None:
    set_stock(harness, 20, 100)
    headers = await harness.login(*ALICE)
    harness.provider.failure_rate = 1.0

    async def order(key: str) -> httpx.Response:
        async with harness.client() as client:
            return await client.post(
                "/api/orders",
                json={"items": [{"product_id": 20, "quantity": 1}]},
                headers={**headers, "Idempotency-Key": key},
            )

    first = await order("during-1")
    assert is_problem(first, 503)
    assert int(first.headers["retry-after"]) >= 1
    assert harness.provider.calls == 3  # three attempts, then the shop gave up
    second = await order("during-2")  # the fourth failure opens the circuit
    assert is_problem(second, 503)
    calls = harness.provider.calls
    fast = await order("during-3")
    assert is_problem(fast, 503)
    assert "unavailable" in fast.json()["detail"]
    assert harness.provider.calls == calls  # the circuit is open: the provider rests
    assert stock_of(harness, 20) == 100  # every failed order gave its stock back
    assert harness.provider.charges == {}
    opened = {"name": "payments", "from": "closed", "to": "open"}
    registry = harness.shop.registry
    assert registry.get_sample_value("resilient_breaker_transitions_total", opened) == 1
    harness.provider.failure_rate = 0.0
    harness.clock.advance(harness.shop.settings.breaker_open_for + 1)
    shared = harness.shop.payments_breaker.shared_store
    if shared is not None:  # on Redis: the periodic sync elects this instance to probe
        await shared.sync_now()
    recovered = await order("after")
    assert recovered.status_code == 201
    assert stock_of(harness, 20) == 99
    retried = await order("during-1")  # a failed order's key may be used again
    assert retried.status_code == 201


async def test_users_see_their_own_orders_and_admins_everyones(harness: Harness) -> None:
    alice_h, bob_h, admin_h = [await harness.login(*user) for user in (ALICE, BOB, ADMIN)]
    set_stock(harness, 9, 5)
    async with harness.client() as client:
        placed = await client.post(
            "/api/orders",
            json={"items": [{"product_id": 9, "quantity": 1}]},
            headers={**alice_h, "Idempotency-Key": "a-1"},
        )
        alice_id = placed.json()["user_id"]
        by_bob = await client.get(f"/api/users/{alice_id}/orders", headers=bob_h)
        by_admin = await client.get(f"/api/users/{alice_id}/orders", headers=admin_h)
    assert is_problem(by_bob, 403)
    assert [o["id"] for o in by_admin.json()["orders"]] == [placed.json()["id"]]


async def test_an_order_is_at_its_location_for_its_owner_and_admins(harness: Harness) -> None:
    alice_h, bob_h, admin_h = [await harness.login(*user) for user in (ALICE, BOB, ADMIN)]
    set_stock(harness, 9, 5)
    async with harness.client() as client:
        placed = await client.post(
            "/api/orders",
            json={"items": [{"product_id": 9, "quantity": 2}]},
            headers={**alice_h, "Idempotency-Key": "a-1"},
        )
        location = placed.headers["location"]
        mine = await client.get(location, headers=alice_h)
        by_admin = await client.get(location, headers=admin_h)
        by_bob = await client.get(location, headers=bob_h)
        anonymous = await client.get(location)
        missing = await client.get("/api/orders/999999", headers=alice_h)
        not_a_number = await client.get("/api/orders/first", headers=alice_h)
    assert placed.status_code == 201
    assert location == f"/api/orders/{placed.json()['id']}"
    assert mine.status_code == 200
    assert {k: mine.json()[k] for k in placed.json()} == placed.json()
    assert by_admin.json() == mine.json()
    assert is_problem(by_bob, 403)
    assert 'error="insufficient_scope"' in by_bob.headers["www-authenticate"]
    assert is_problem(anonymous, 401)
    assert is_problem(missing, 404)
    assert is_problem(not_a_number, 404)


async def test_refusals_carry_the_realm_as_the_auth_docs_show(harness: Harness) -> None:
    bob = await harness.login(*BOB)
    alice_id = "1"
    async with harness.client() as client:
        anonymous = await client.post(
            "/api/orders", json={"items": []}, headers={"Idempotency-Key": "k"}
        )
        anonymous_list = await client.get(f"/api/users/{alice_id}/orders")
        price = await client.put("/api/products/7", json={"price_cents": 1}, headers=bob)
        others = await client.get(f"/api/users/{alice_id}/orders", headers=bob)
    for response in (anonymous, anonymous_list):
        assert is_problem(response, 401)
        assert response.headers["www-authenticate"] == 'Bearer realm="api"'
    for response in (price, others):
        assert is_problem(response, 403)
        assert response.headers["www-authenticate"] == (
            'Bearer realm="api", error="insufficient_scope", '
            'error_description="the token does not grant role:admin"'
        )


# -- the whole API ----------------------------------------------------------------------


async def test_each_user_has_a_token_bucket_on_the_api(harness: Harness) -> None:
    alice, bob = await harness.login(*ALICE), await harness.login(*BOB)
    async with harness.client() as client:
        statuses = [
            (await client.get("/api/products/1", headers=alice)).status_code for _ in range(45)
        ]
        bobs = await client.get("/api/products/1", headers=bob)
    assert statuses.count(200) == 40  # the burst
    assert statuses[-1] == 429
    assert bobs.status_code == 200  # another user, another bucket


async def test_health_readiness_and_metrics(harness: Harness) -> None:
    async with harness.client() as client:
        assert (await client.get("/healthz")).json() == {"status": "ok", "process": os.getpid()}
        ready = await client.get("/readyz")
        await client.get("/api/products/3")
        metrics = await client.get("/metrics")
        jwks = await client.get("/.well-known/jwks.json")
    assert ready.status_code == 200
    expected = {"database"} | ({"redis"} if harness.shop.redis is not None else set())
    assert set(ready.json()["checks"]) == expected
    assert 'shop_catalog_loads_total{kind="item"} 1.0' in metrics.text
    assert [key["kid"] for key in jwks.json()["keys"]] == [harness.shop.issuer.kid]


@pytest.mark.parametrize("redis_url", ["redis"], indirect=True)
async def test_readiness_fails_when_redis_is_down(make_shop: ShopFactory) -> None:
    harness = await make_shop()
    assert harness.shop.redis is not None
    harness.shop.redis.connection_pool.connection_kwargs["port"] = 1  # a closed port
    await harness.shop.redis.connection_pool.disconnect()
    async with harness.client() as client:
        ready = await client.get("/readyz")
    assert is_problem(ready, 503)
    assert ready.json()["checks"]["redis"].startswith("failed")


# -- an external issuer -------------------------------------------------------------------


@pytest.mark.parametrize("redis_url", ["memory"], indirect=True)
async def test_an_external_issuer_is_one_setting_away(make_shop: ShopFactory) -> None:
    # A Cognito-style user pool: access tokens without `aud`, with `token_use`, the app
    # client's `client_id` and `cognito:groups`; the shop's own login is then off.
    with LocalIssuer(algorithms=("RS256",)) as pool:
        harness = await make_shop(
            own_jwks=False, oidc_issuer=pool.issuer, oidc_client_id="shop-web"
        )

        def token(**claims: object) -> dict[str, str]:
            now = int(harness.clock.time())  # the shop's (fake) time
            base = {"aud": None, "token_use": "access", "client_id": "shop-web",
                    "iat": now, "exp": now + 300}  # fmt: skip
            return {"Authorization": f"Bearer {pool.mint({**base, **claims})}"}

        async with harness.client() as client:
            login = await client.post("/api/login", json={"username": "a", "password": "b"})
            mine = await client.get("/api/users/user-1/orders", headers=token())
            theirs = await client.get("/api/users/user-2/orders", headers=token())
            admin = await client.get(
                "/api/users/user-2/orders", headers=token(**{"cognito:groups": ["admin"]})
            )
            id_token = await client.get("/api/users/user-1/orders", headers=token(token_use="id"))
            other_app = await client.get(
                "/api/users/user-1/orders", headers=token(client_id="another-app")
            )
    assert is_problem(login, 404)
    assert mine.json() == {"orders": []}
    assert is_problem(theirs, 403)
    assert admin.status_code == 200
    assert is_problem(id_token, 401)
    assert is_problem(other_app, 401)


@pytest.mark.parametrize("redis_url", ["memory"], indirect=True)
async def test_an_external_token_that_names_no_user_is_refused(make_shop: ShopFactory) -> None:
    # A machine's token (client credentials) has no `sub`; one whose `sub` is not a string
    # names no user either. Neither may place or read orders, and neither is a 500.
    with LocalIssuer(algorithms=("RS256",)) as pool:
        harness = await make_shop(
            own_jwks=False, oidc_issuer=pool.issuer, oidc_client_id="shop-web"
        )
        now = int(harness.clock.time())
        base = {"aud": None, "token_use": "access", "client_id": "shop-web", "iat": now,
                "exp": now + 300, "scope": "orders:write orders:read"}  # fmt: skip
        order = {"items": [{"product_id": 1, "quantity": 1}]}
        responses = []
        async with harness.client() as client:
            for sub in (None, 42, ""):  # None: no sub claim at all
                bearer = {"Authorization": f"Bearer {pool.mint({**base, 'sub': sub})}"}
                responses.append(
                    await client.post(
                        "/api/orders", json=order, headers={**bearer, "Idempotency-Key": "m"}
                    )
                )
                responses.append(await client.get("/api/users/1/orders", headers=bearer))
                responses.append(await client.get("/api/orders/1", headers=bearer))
    for response in responses:
        assert response.status_code in {401, 403}, response.text
        assert is_problem(response, response.status_code)
        assert response.headers["www-authenticate"].startswith('Bearer realm="api", error=')


# -- Redis outages ------------------------------------------------------------------------


@pytest.mark.parametrize("redis_url", ["fresh"], indirect=True)
async def test_a_redis_outage_follows_each_blocks_policy(
    make_shop: ShopFactory, request: pytest.FixtureRequest
) -> None:
    harness = await make_shop()
    alice = await harness.login(*ALICE)
    request.getfixturevalue("fresh_redis_server").stop()
    async with harness.client() as client:
        # Rate limits fail open, the cache loads straight from the database, tokens
        # still validate (their keys come over HTTP): the catalog and logins keep working.
        catalog = await client.get("/api/products", params={"category": "home"})
        product = await client.get("/api/products/12", headers=alice)
        login = await client.post("/api/login", json={"username": "bob", "password": "builder"})
        # Idempotency fails closed: an order could otherwise be placed twice.
        order = await client.post(
            "/api/orders",
            json={"items": [{"product_id": 12, "quantity": 1}]},
            headers={**alice, "Idempotency-Key": "during-outage"},
        )
        ready = await client.get("/readyz")
    assert catalog.status_code == 200
    assert product.status_code == 200
    assert login.status_code == 200
    assert is_problem(order, 503)
    assert int(order.headers["retry-after"]) >= 1
    assert is_problem(ready, 503)
    assert harness.provider.charges == {}
